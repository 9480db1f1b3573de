# Lets tests import the top-level modules (model.py, loss.py, ...) and the folders (toy, plumbing, bench)
# from any working directory.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests' E5 embedder for the tiny presets: the random tiny CLIP (model.default_embed_model), so
# no test trains toy-clip unless it asks for it; subprocesses (torchrun, CLI tests) inherit it.
os.environ.setdefault("RPO_DIFFUSION_TOY_E5", "tiny")

import pytest


@pytest.fixture(autouse=True)
def hub_variables_of_no_shell(monkeypatch):
    """No test depends on the hub variables of the shell it runs in (an offline user's
    HF_HUB_OFFLINE=1, say): each test starts with none of them set, and the libraries' own switches,
    read once at their import, back at their defaults. A test that needs the hub offline says so."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    try:
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    except ImportError:
        pass
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", False)


def finished_run(tmp_path_factory, steps):
    """A finished tiny RPO run of `steps` steps, a checkpoint at each (checkpoint-000001, ...), with
    metrics.jsonl, unet/, args.json and README.md: the run the hostile tests resume and break."""
    import train
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--max_steps", str(steps), "--save_every", "1", "--keep_checkpoints", "5", "--out_dir", str(out),
                "--no_progress", "--num_items", "4", "--batch_size", "4"])
    return out
