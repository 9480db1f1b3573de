# Lets tests import the top-level modules (model.py, loss.py, ...) and the folders (toy, plumbing, bench)
# from any working directory.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests' E5 embedder for the tiny presets: the random tiny CLIP (model.default_embed_model), so
# no test trains toy-clip unless it asks for it; subprocesses (torchrun, CLI tests) inherit it.
os.environ.setdefault("RPO_DIFFUSION_TOY_E5", "tiny")
