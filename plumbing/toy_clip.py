"""
toy-clip's weights: the tiny CLIP (plumbing.tiny.tiny_clip) trained contrastively on the toy world,
so that E5's f(c, x) and E6's weights ω carry information on toy data (the random tiny CLIP maps
every toy sample to nearly the same point: ω is uniform whatever τ). model.load_embedder("toy-clip")
(train.py --embed_model toy-clip, the tiny presets' default) reads them here: the shipped ones
(results/toy-study/toy-clip) where they were trained by this RECIPE, else the cache folder named by
a hash of the recipe,

    $RPO_DIFFUSION_CACHE (default ~/.cache/rpo-diffusion)/toy-clip-<hash>/model.safetensors

which `python -m toy.clip` (the training and its measurements, toy/clip.py) fills.
"""
import hashlib
import json
import os

from safetensors.torch import load_file

from plumbing import tiny
from plumbing.images import STYLES

RECIPE = dict(version=1, seed=0, steps=600, lr=2e-3, weight_decay=0.1, warmup=30, resolution=16,
              styles=list(STYLES), style_fraction=0.5)  # style_fraction: share of styled renders

# The toy CLIP every committed toy result used, shipped with the code as the toy base is: every
# machine then computes E5/E6 with the same network (one trained anew elsewhere rounds otherwise).
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "toy-study", "toy-clip")


def cache_root():
    return os.environ.get("RPO_DIFFUSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rpo-diffusion")


def recipe_key(recipe):
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir(recipe=None, root=None):
    recipe = recipe or RECIPE
    return os.path.join(root or cache_root(), f"toy-clip-{recipe_key(recipe)}")


def source(recipe=None, root=None, shipped=SHIPPED):
    """The folder toy-clip for `recipe` is read from: the shipped one where its recipe is this one,
    else its cache folder (which toy.clip.load fills when it trains)."""
    recipe = recipe or RECIPE
    meta = os.path.join(shipped or "", "recipe.json")
    if shipped and os.path.isfile(meta) and os.path.isfile(os.path.join(shipped, "model.safetensors")) \
            and json.load(open(meta)).get("recipe") == recipe:
        return shipped
    return cache_dir(recipe, root)


def load(recipe=None, root=None, shipped=SHIPPED):
    """The toy CLIP trained by `recipe` (default RECIPE) -> (model, tokenizer), from source()'s
    folder; None where no folder holds weights of this recipe."""
    recipe = recipe or RECIPE
    folder = source(recipe, root, shipped)
    weights, meta_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "recipe.json")
    if not (os.path.isfile(weights) and os.path.isfile(meta_path)):
        return None
    with open(meta_path) as f:
        if json.load(f).get("recipe") != recipe:
            return None
    clip, tok = tiny.tiny_clip()
    clip.load_state_dict(load_file(weights))
    return clip.eval().requires_grad_(False), tok
