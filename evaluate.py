"""
Evaluation: score sample folders, tabulate mean ± std over seeds, plot training curves.

    python evaluate.py --images out/rpo out/dpo --labels rpo,dpo --metrics style,content --style winter
    python evaluate.py --curves rpo=runs/rpo dpo=runs/dpo --out curves.png

Toy part (SPEC §10, Style Alignment on data.py's procedural set): a small CNN trained on
procedural renders says, per image, whether the style shows (style score) and whether the
prompt's shape, colour and background are still there (content score). It is trained once per
(style, resolution, seed), cached, and refuses to score anything unless its held-out accuracy
is >= 0.95: a weak scorer would make every table below meaningless. Reward models for real
images (PickScore, ...) will be a later section with their own --metrics names.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import data

# ----------------------------------------------------------------------------------------------
# 1. Toy scorer

# Parse prompts exactly as render_toy does; the fallback only matters if data.py renames it.
PROMPT_RE = getattr(data, "_PROMPT_RE", None) or re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
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


@contextlib.contextmanager
def one_thread():
    # The scorer's convs are tiny (16x16, <=64 channels): a second intra-op thread buys little,
    # and on a busy machine (other jobs on the same cores) 2 threads measured 20x SLOWER than 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def toy_labels(prompt):
    """'a red circle on a gray background' -> (shape, colour, background) indices."""
    m = PROMPT_RE.match(prompt)
    if not m or m[1] not in data.COLOURS or m[2] not in data.SHAPES or m[3] not in data.BACKGROUNDS:
        raise ValueError(f"toy scorer: not a toy prompt: {prompt!r}")
    return data.SHAPES.index(m[2]), list(data.COLOURS).index(m[1]), list(data.BACKGROUNDS).index(m[3])


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
    rng, prompts = np.random.default_rng(seed), data.toy_prompts("all")
    imgs, labels = [], {k: [] for k in HEADS}
    for _ in range(n):
        prompt = prompts[rng.integers(len(prompts))]
        img, styled = data.render_toy(prompt, resolution, rng), rng.random() < 0.5
        imgs.append(data.apply_style(img, style, rng) if styled else img)
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


def load_toy_scorer(style="winter", resolution=16, cache=None, seed=0):
    """Train (or load from cache) the toy scorer; gate on held-out accuracy -> (net, accuracy)."""
    if style not in data.STYLES:
        raise SystemExit(f"error: unknown style {style!r}; expected one of {data.STYLES}")
    cache = cache or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache",
                                  f"toy_scorer_{style}_{resolution}.safetensors")
    meta_path = os.path.splitext(cache)[0] + ".json"
    config = dict(version=VERSION, style=style, resolution=resolution, seed=seed, **TRAIN)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) and os.path.isfile(cache) else {}
    net = toy_scorer_net()
    with one_thread():
        if meta.get("config") == config:
            net.load_state_dict(load_file(cache))
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
    with one_thread():
        out = toy_logits(scorer, x)
    labels = torch.tensor([toy_labels(p) for p in prompts]).reshape(-1, 3)
    scores = {"style": torch.sigmoid(out["style"][:, 0])}
    for i, k in enumerate(("shape", "colour", "background")):
        scores[f"{k}_ok"] = (out[k].argmax(1) == labels[:, i]).float()
    scores["content"] = torch.stack([scores[f"{k}_ok"] for k in KEEPS[scorer.style]]).prod(0)
    return scores


# ----------------------------------------------------------------------------------------------
# 2. Tables: per model, mean ± std over seeds of each seed's mean over its images


def summarize(values_per_seed):
    """-> (mean, sample std with ddof=1); the spread between seeds, so 0.0 for a single seed."""
    v = np.asarray(values_per_seed, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown_table(rows, columns):
    def cell(v):
        if isinstance(v, tuple):
            return f"{v[0]:.3f} ± {v[1]:.3f}"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_samples(folder, resolution):
    """A sample.py output folder -> (images (N,3,R,R) in [-1,1], prompts, seeds)."""
    index = os.path.join(folder, "samples.jsonl")
    if not os.path.isfile(index):
        raise SystemExit(f"error: {folder}: no samples.jsonl (not a sample.py output folder?)")
    images, prompts, seeds = [], [], []
    with open(index, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"error: {index}:{n}: not valid JSON")
            if not all(k in rec for k in ("prompt", "seed", "file")):
                raise SystemExit(f"error: {index}:{n}: needs the keys prompt, seed and file")
            path = os.path.join(folder, rec["file"])
            if not os.path.isfile(path):
                raise SystemExit(f"error: {index}:{n}: image file {path} is missing")
            with Image.open(path) as im:
                im = im.convert("RGB")
            if im.size != (resolution, resolution):
                if min(im.size) < resolution:
                    raise SystemExit(f"error: {path} is {im.size[0]}x{im.size[1]}, smaller than the "
                                     f"scorer's {resolution}px; pass --resolution")
                im = im.resize((resolution, resolution), Image.BOX)  # box = the renders' own filter
            images.append(data.image_to_tensor(im))
            prompts.append(rec["prompt"])
            seeds.append(rec["seed"])
    if not images:
        raise SystemExit(f"error: {index} lists no samples")
    return torch.stack(images), prompts, seeds


def evaluate_folder(folder, label, scorer, metrics):
    images, prompts, seeds = load_samples(folder, scorer.resolution)
    try:
        scores = score_toy(scorer, images, prompts)
    except ValueError as e:
        raise SystemExit(f"error: {folder}: {e}")
    run = {"label": label, "dir": folder, "n_images": len(prompts), "metrics": {}}
    for m in metrics:
        per_seed = {str(s): scores[m][[i for i, t in enumerate(seeds) if t == s]].mean().item()
                    for s in sorted(set(seeds))}
        mean, std = summarize(list(per_seed.values()))
        run["metrics"][m] = {"mean": mean, "std": std, "per_seed": per_seed}
    return run


# ----------------------------------------------------------------------------------------------
# 3. Plots (matplotlib, Agg: files only, no display needed)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib")
    return plt


def plot_curves(runs, out_png, style_points=None):
    """runs {label: run_dir with train.py's metrics.jsonl}; style_points {label: [(step, score)]}.
    Saves a 1500x400 px PNG: loss, implicit accuracy and style score against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for i, (label, run_dir) in enumerate(runs.items()):
        path, colour = os.path.join(run_dir, "metrics.jsonl"), f"C{i}"
        if not os.path.isfile(path):
            raise SystemExit(f"error: {run_dir}: no metrics.jsonl (not a train.py output folder?)")
        with open(path) as f:
            log = [json.loads(line) for line in f if line.strip()]
        steps, loss = np.array([r["step"] for r in log]), np.array([r["loss"] for r in log])
        # Per-step losses are noisy (one t and ε draw per step): show a 20-step moving average.
        w = min(20, len(loss))
        axes[0].plot(steps, loss, color=colour, alpha=0.2, lw=0.8)
        axes[0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), color=colour, label=label)
        acc = [(r["step"], r["implicit_acc"]) for r in log if "implicit_acc" in r]  # none for SFT
        if acc:
            axes[1].plot(*zip(*acc), color=colour, alpha=0.7, label=label)
        if style_points and style_points.get(label):
            axes[2].plot(*zip(*sorted(style_points[label])), "o-", color=colour, label=label)
    for ax, name in zip(axes, ("loss (20-step mean)", "implicit accuracy", "style score")):
        ax.set_xlabel("step")
        ax.set_title(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def plot_tradeoff(points, out_png):
    """points {method: [(lr, style_mean, style_std, content_mean, content_std)]} -> 600x500 PNG:
    style (x) against content (y), one line per method through its lr grid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for method, pts in points.items():
        lr, sm, ss, cm, cs = zip(*sorted(pts))
        ax.errorbar(sm, cm, xerr=ss, yerr=cs, fmt="o-", capsize=3, label=method)
        for p in zip(lr, sm, cm):
            ax.annotate(f"lr={p[0]:g}", p[1:], textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("style score")
    ax.set_ylabel("content score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 4. Command line

TOY_METRICS = ("style", "content", "shape_ok", "colour_ok", "background_ok")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", help="sample.py output folders (each with samples.jsonl)")
    p.add_argument("--labels", default=None, help="comma-separated row names (default: folder names)")
    p.add_argument("--metrics", default="style,content", help=f"comma-separated, toy: {','.join(TOY_METRICS)}")
    p.add_argument("--style", default="winter", choices=list(data.STYLES))
    p.add_argument("--resolution", type=int, default=16, help="toy scorer input size")
    p.add_argument("--scorer_cache", default=None,
                   help="default: .cache/toy_scorer_{style}_{resolution}.safetensors next to this file")
    p.add_argument("--scorer_seed", type=int, default=0)
    p.add_argument("--curves", nargs="+", metavar="LABEL=RUN_DIR", help="plot train.py metrics instead")
    p.add_argument("--style_points", default=None, help="--curves: JSON {label: [[step, style], ...]}")
    p.add_argument("--out", default=None, help="results.json (scoring) or curves.png (--curves)")
    args = p.parse_args(argv)
    if args.curves:
        runs = dict(c.split("=", 1) for c in args.curves if "=" in c)
        if len(runs) != len(args.curves):
            raise SystemExit("error: --curves takes LABEL=RUN_DIR pairs")
        points = json.load(open(args.style_points)) if args.style_points else None
        plot_curves(runs, args.out or "curves.png", points)
        return print(f"wrote {args.out or 'curves.png'}")
    if not args.images:
        raise SystemExit("error: give --images DIR [DIR ...] or --curves LABEL=RUN_DIR [...]")
    metrics = args.metrics.split(",")
    if not set(metrics) <= set(TOY_METRICS):
        raise SystemExit(f"error: unknown --metrics {args.metrics!r}; toy metrics are {','.join(TOY_METRICS)}")
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(d)) for d in args.images]
    if len(labels) != len(args.images):
        raise SystemExit(f"error: {len(labels)} --labels for {len(args.images)} --images folders")
    for d in args.images:  # fail on a bad folder before spending time on the scorer
        if not os.path.isfile(os.path.join(d, "samples.jsonl")):
            raise SystemExit(f"error: {d}: no samples.jsonl (not a sample.py output folder?)")
    scorer, acc = load_toy_scorer(args.style, args.resolution, args.scorer_cache, args.scorer_seed)
    runs = [evaluate_folder(d, lab, scorer, metrics) for d, lab in zip(args.images, labels)]
    rows = [{"model": r["label"], "images": r["n_images"],
             **{m: (r["metrics"][m]["mean"], r["metrics"][m]["std"]) for m in metrics}} for r in runs]
    print(markdown_table(rows, ["model", "images", *metrics]), end="")
    out = args.out or "results.json"
    with open(out, "w") as f:
        json.dump({"style": args.style, "scorer_accuracy": acc, "runs": runs}, f, indent=1)
    return runs


if __name__ == "__main__":
    main()
