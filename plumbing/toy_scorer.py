"""
The toy scorer (Style Alignment on the toy world, docs/method.md; evaluate.py's metrics toy_style,
toy_content, ...): a small CNN trained on procedural renders says, per image, whether the style
shows (style score) and whether the prompt's shape, colour and background are still there
(content score). It is trained once per (style, resolution, seed), cached, and refuses to score
anything unless its held-out accuracy is >= 0.95: a weak scorer would make every table
meaningless.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from plumbing import speed
from plumbing.images import BACKGROUNDS, COLOURS, PROMPT_RE, SHAPES, STYLES, apply_style, render_toy, toy_prompts  # (PROMPT_RE: prompts parsed as render_toy does)


HEADS = {"style": 1, "shape": 3, "colour": 6, "background": 4}  # logits per head, in this order

# Content attributes that survive each style. "sketch" is grayscale on paper: the fill tone is
# 0.12·(255 - luma), so red, purple and blue (lumas 84..99) land within 2 grey levels, and the
# four backgrounds within 6..13 levels, about the brightness jitter below. A scorer trained to
# read them from sketches anyway got colour 0.45-0.57 and background 0.80-0.86 on held-out
# sketches, so for sketch only the shape counts (for plain and styled images alike, so that
# content means the same thing for both).
KEEPS = {"winter": ("shape", "colour", "background"), "sketch": ("shape",)}

TRAIN = dict(steps=1500, batch=128, lr=3e-3, pool=16384, check_every=100, stop_at=0.99)

VERSION = 1  # bump when the architecture, data or augmentation changes: invalidates caches

THRESHOLD = 0.95

def toy_labels(prompt):
    """'a red circle on a gray background' -> (shape, colour, background) indices."""
    m = PROMPT_RE.match(prompt)
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        raise ValueError(f"toy scorer: not a toy prompt: {prompt!r}")
    return SHAPES.index(m[2]), list(COLOURS).index(m[1]), list(BACKGROUNDS).index(m[3])

def toy_scorer_net():
    # ~48k params. Two stride-2 convs take 16x16 to 4x4 with a receptive field covering the
    # whole shape; global average AND max pooling make it position-invariant (shapes move) while
    # keeping both area statistics (background, colour, blue cast) and sparse peaks (snow).
    def block(i, o, s):
        return [torch.nn.Conv2d(i, o, 3, s, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
    pool = torch.nn.ModuleList([torch.nn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveMaxPool2d(1)])
    trunk = torch.nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 48, 2), *block(48, 64, 1))
    return torch.nn.ModuleDict(dict(trunk=trunk, pool=pool, head=torch.nn.Linear(128, sum(HEADS.values()))))

def toy_logits(net, x):
    h = net["trunk"](x)
    h = torch.cat([p(h).flatten(1) for p in net["pool"]], dim=1)
    return dict(zip(HEADS, net["head"](h).split(list(HEADS.values()), dim=1)))

def toy_renders(n, style, resolution, seed):
    """n renders of random prompts from all 72, styled with p=0.5 -> (x [-1,1], labels dict)."""
    rng, prompts = np.random.default_rng(seed), toy_prompts("all")
    imgs, labels = [], {k: [] for k in HEADS}
    for _ in range(n):
        prompt = prompts[rng.integers(len(prompts))]
        img, styled = render_toy(prompt, resolution, rng), rng.random() < 0.5
        imgs.append(apply_style(img, style, rng) if styled else img)
        for k, v in zip(("style", "shape", "colour", "background"), (int(styled), *toy_labels(prompt))):
            labels[k].append(v)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, {k: torch.tensor(v) for k, v in labels.items()}

def augment(x, g):
    """What diffusion samples do to a clean render: Gaussian noise of random strength (σ up to
    0.15 in [-1,1] units, per image), a small brightness offset and contrast change about the
    image mean, then the clamp that saving a sample applies."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15) + mean + u(-0.08, 0.08)
    return (x + u(0, 0.15) * torch.randn(x.shape, generator=g)).clamp(-1, 1)

def toy_loss(out, y, style):
    # Content heads learn from plain images always and from styled ones only where the style
    # keeps that attribute (KEEPS): winter keeps all three, so they learn its shifted colours.
    loss = F.binary_cross_entropy_with_logits(out["style"][:, 0], y["style"].float())
    for k in ("shape", "colour", "background"):
        mask = (y["style"] == 0) | (k in KEEPS[style])
        loss = loss + F.cross_entropy(out[k][mask], y[k][mask])
    return loss

@torch.no_grad()
def toy_accuracy(net, x, y, style):
    net.eval()
    out = toy_logits(net, x)
    acc = {"style": ((out["style"][:, 0] > 0).long() == y["style"]).float().mean().item()}
    for k in ("shape", "colour", "background"):
        mask = (y["style"] == 0) | (k in KEEPS[style])
        acc[k] = (out[k][mask].argmax(1) == y[k][mask]).float().mean().item()
    return acc

def train_toy_scorer(style, resolution, seed):
    """Seeded CPU training on a fixed pool of renders with fresh augmentation every batch. Stops
    early once a validation set (its own seed, not the held-out one) reaches TRAIN['stop_at']."""
    with torch.random.fork_rng(devices=[]):  # seed the init without moving the caller's RNG
        torch.manual_seed(seed)
        net = toy_scorer_net()
    g = torch.Generator().manual_seed(seed)
    x, y = toy_renders(TRAIN["pool"], style, resolution, [seed, 0])
    xv, yv = toy_renders(1000, style, resolution, [seed, 1])
    xv = augment(xv, torch.Generator().manual_seed(1000 * seed + 1))
    opt = torch.optim.AdamW(net.parameters(), lr=TRAIN["lr"], weight_decay=1e-4)
    for step in range(1, TRAIN["steps"] + 1):
        net.train()
        idx = torch.randint(len(x), (TRAIN["batch"],), generator=g)
        loss = toy_loss(toy_logits(net, augment(x[idx], g)), {k: v[idx] for k, v in y.items()}, style)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % TRAIN["check_every"] == 0 and min(toy_accuracy(net, xv, yv, style).values()) >= TRAIN["stop_at"]:
            break
    net.eval()
    return net, step

def heldout_accuracy(net, style, resolution, seed):
    """Accuracy on 1000 renders (all 72 prompts) from seeds that no training or validation draw
    uses, augmented like the training batches: the scorer must be right on noisy images too."""
    x, y = toy_renders(1000, style, resolution, [seed, 2])
    return toy_accuracy(net, augment(x, torch.Generator().manual_seed(1000 * seed + 2)), y, style)

def check_accuracy(acc, threshold=THRESHOLD):
    bad = {k: v for k, v in acc.items() if v < threshold}
    if bad:
        raise SystemExit(f"error: toy scorer accuracy {', '.join(f'{k}={v:.3f}' for k, v in bad.items())} "
                         f"< {threshold} on held-out renders; refusing to report scores from a weak scorer")

# The scorers every committed toy result was scored with (winter and sketch, 16 px, seed 0), shipped
# with the code as the toy base is: every machine scores with the same networks. Training one anew
# on another CPU rounds differently, and a scorer's few borderline calls move a table's figures.
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "toy-study", "scorer")


def load_toy_scorer(style="winter", resolution=16, cache=None, seed=0, shipped=SHIPPED):
    """The toy scorer: the shipped one where its recipe (config) is this one, else loaded from
    `cache`, else trained now and cached; gated on held-out accuracy -> (net, accuracy)."""
    if style not in STYLES:
        raise SystemExit(f"error: unknown style {style!r}; expected one of {STYLES}")
    given = cache is not None  # (--scorer_cache: a path the user named, which may hold the user's own file)
    cache = cache or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache",
                                  f"toy_scorer_{style}_{resolution}.safetensors")
    config = dict(version=VERSION, style=style, resolution=resolution, seed=seed, **TRAIN)
    ship = os.path.join(shipped or "", f"toy_scorer_{style}_{resolution}.safetensors")
    if shipped and os.path.isfile(os.path.splitext(ship)[0] + ".json") and \
            json.load(open(os.path.splitext(ship)[0] + ".json")).get("config") == config:
        cache = ship  # (read only: it has this config, so nothing is written back)
    meta_path = os.path.splitext(cache)[0] + ".json"
    meta = cache_record(cache, meta_path, given and cache != ship)
    net = toy_scorer_net()
    if meta.get("config") == config and not cached_weights(net, cache, meta_path, given):
        meta = {}  # (the default cache, unreadable: trained again and written anew)
    with speed.one_thread():
        if meta.get("config") == config:
            net.eval()
            steps, how = meta.get("train_steps"), f"loaded {cache}"
        else:
            t0 = time.time()
            net, steps = train_toy_scorer(style, resolution, seed)
            how = f"trained {steps} steps in {time.time() - t0:.1f}s"
        acc = heldout_accuracy(net, style, resolution, seed)
    print(f"toy scorer ({style}, {resolution}px, {how}): held-out accuracy "
          + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), file=sys.stderr)
    check_accuracy(acc)
    if meta.get("config") != config:  # save only a scorer that passed the gate
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, cache)
        with open(meta_path, "w") as f:
            json.dump({"config": config, "accuracy": acc, "train_steps": steps}, f, indent=1)
    net.style, net.resolution = style, resolution  # what score_toy needs besides the weights
    return net, acc

def cache_record(cache, meta_path, given):
    """The record beside a cached scorer ({} where neither file is there: a new cache). Anything
    else that is not a cache (no record, a record that is not JSON's object, weights missing) is
    one line for a path the user gave, whose files are never replaced; the default cache in
    .cache/ is this program's own: trained again."""
    if not os.path.lexists(cache) and not os.path.lexists(meta_path):
        return {}
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and os.path.isfile(cache):
        return meta
    if given:
        raise SystemExit(f"error: --scorer_cache {cache}: not a toy scorer cache (its weights, and {meta_path} "
                         f"beside them); name a new file or an earlier cache")
    return {}


def cached_weights(net, cache, meta_path, given):
    """NET loaded from CACHE: True; weights cut short or of another net: one line for --scorer_cache,
    False (trained again) for the default cache."""
    try:
        net.load_state_dict(load_file(cache))
        return True
    except Exception as err:  # (safetensors' own error type, a RuntimeError for other tensors)
        if given:
            raise SystemExit(f"error: --scorer_cache {cache}: cannot be read ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); delete it and {meta_path} to train the scorer again")
        return False


@torch.no_grad()
def score_toy(scorer, images, prompts):
    """Per-image scores. images: float (N,3,H,W) in [-1,1] or uint8 (N,H,W,3); resized to the
    scorer's training resolution with area averaging (= PIL BOX for integer factors)."""
    if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
        images = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if len(images) != len(prompts):
        raise ValueError(f"score_toy: {len(images)} images but {len(prompts)} prompts")
    x, R = images.float().clamp(-1, 1), scorer.resolution
    if x.shape[-2:] != (R, R):
        x = F.interpolate(x, size=(R, R), mode="area")
    with speed.one_thread():
        out = toy_logits(scorer, x)
    labels = torch.tensor([toy_labels(p) for p in prompts]).reshape(-1, 3)
    prob = torch.sigmoid(out["style"][:, 0])
    scores = {"style": (prob > 0.5).float(), "style_prob": prob}  # style: called styled (its mean: a share)
    for i, k in enumerate(("shape", "colour", "background")):
        scores[f"{k}_ok"] = (out[k].argmax(1) == labels[:, i]).float()
    scores["content"] = torch.stack([scores[f"{k}_ok"] for k in KEEPS[scorer.style]]).prod(0)
    return scores


def identity(style="winter", resolution=16, seed=0):
    """Which scorer made a score: its style, input size, seed and the hash of its recipe and version.
    A score cache keyed on it is never answered by another scorer."""
    config = dict(version=VERSION, style=style, resolution=resolution, seed=seed, **TRAIN)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return f"toy-scorer {style} {resolution}px seed {seed} v{VERSION} {digest}"
