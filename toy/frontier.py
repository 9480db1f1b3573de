"""
The style-content frontier of the toy Style Alignment study (docs/toy-study.md#the-frontier):
does relative preference optimization (RPO) keep more of the prompt than DPO at the same
amount of style learned?

    python -m toy.frontier                     # run (or resume) the study: one process per core,
    python -m toy.frontier & python -m toy.frontier    #   started twice on 2 cores, they share the work
    python -m toy.frontier --collect           # -> results/toy-study/frontier.{json,md,png}

Every variant (SFT, DPO, RPO outside at τ 0.1/0.5/1, RPO inside, RPO with text-only embeddings)
is trained from the same toy base (toy/experiment.py's) over its own learning-rate grid, 4 points
per decade from "no change" to "collapse" and 8 per decade across the transition between them,
for 3 training seeds; then DPO and RPO once more at 16 pairs per step (2 points per decade),
and DPO, RPO (4 per decade) and SFT (2 per decade) on a second style (sketch, its own base), at
one seed. E5 uses toy-clip, the tiny CLIP trained on the toy world, so RPO's weights ω see the
content and style of each pair.

Each run is 150 steps of 8 pairs (so the grid fits in a few hours on 2 cores) and is scored on
the 12 held-out prompts × 8 sampling seeds: style = share of samples the style scorer calls
styled, content = share that still show the prompt's shape, colour and background. The base is
scored the same way, on each training seed's sampling seeds. A run's folder holds its UNet and
score.json; a rerun skips both, and two processes claim jobs with a lock file each, so the
study resumes where it stopped.

The comparison: along each seed's lr grid, content is interpolated linearly at a target style
(0.6, 0.7, 0.8); the RPO - DPO difference is taken per seed (same seed: same data order and
noise) and reported as mean ± a 95% t-interval over the seeds.
"""
import argparse
import json
import math
import os
import time

import numpy as np

from plumbing import plots
from toy import scorer as toy_scorer
from toy import experiment as E
import toy
import train

STEPS, SAMPLE_SEEDS = 150, 8
TARGETS = (0.6, 0.7, 0.8)  # matched style levels for the comparison
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, 97.5% quantile, by degrees of freedom


def grid(lo, n=8, per_decade=4):
    return [float(f"{lo * 10 ** (k / per_decade):.2g}") for k in range(n)]


def lrs(lo, n, *fine):
    """The lr grid: n points at 4 per decade from lo, plus, for each (a, b, per_decade) in fine,
    the points of a per_decade grid from lo strictly inside (a, b): the method's transition from
    'no change' to 'collapse'. (The finer grids contain the coarser ones, so points coincide.)"""
    out = set(grid(lo, n))
    for a, b, per_decade in fine:
        out |= {x for x in grid(lo, n * per_decade // 4, per_decade) if a < x < b}
    return sorted(out)


# label -> (train.py flags, fields for the JSON rows, lr grid at seed 0, the part of it the other
# seeds run). Each grid runs at 4 per decade from where the method barely moves the base
# (calibrated on the 300-step demo: DPO 1e-7 no change; RPO with spread-out ω needs ~10x more;
# SFT, no β, far more) until most content is gone (content <= COLLAPSE), and at 8 per decade
# between the last seed-0 point that left the base unchanged and the first that collapsed (SFT's
# transition is under a decade wide: 16 per decade there); the other seeds start one point below
# seed 0's last unchanged one.
VARIANTS = {
    "sft": (["--loss", "sft"], dict(method="sft"), lrs(1e-5, 11, (5.6e-5, 1.8e-3, 8), (1.3e-4, 7.5e-4, 16)), 1e-5),
    "dpo": (["--loss", "dpo"], dict(method="dpo"), lrs(1e-7, 8, (1.8e-7, 3.2e-6, 8)), 1.8e-7),
    "rpo τ=0.1": (["--loss", "rpo", "--tau", "0.1"], dict(method="rpo", tau=0.1),
                  lrs(1e-7, 13, (3.2e-7, 5.6e-5, 8)), 1.8e-7),
    "rpo τ=0.5": (["--loss", "rpo", "--tau", "0.5"], dict(method="rpo", tau=0.5),
                  lrs(3.2e-7, 10, (1e-6, 5.7e-5, 8)), 5.7e-7),
    "rpo τ=1": (["--loss", "rpo", "--tau", "1"], dict(method="rpo", tau=1.0),
                [5.6e-7] + lrs(1e-6, 9, (1.8e-6, 1e-4, 8)), 5.6e-7),  # (seeds 1, 2 moved already at 1e-6)
    "rpo τ=0.5 inside": (["--loss", "rpo", "--tau", "0.5", "--rpo_weighting", "inside"],
                         dict(method="rpo", tau=0.5, weighting="inside"), lrs(1e-7, 8, (1.8e-7, 3.2e-6, 8)), 1.8e-7),
    "rpo τ=0.5 text": (["--loss", "rpo", "--tau", "0.5", "--embed", "text"],
                       dict(method="rpo", tau=0.5, embed="text"), lrs(3.2e-7, 11, (1e-6, 5.7e-5, 8)), 5.7e-7),
}
VARIANTS = {v: (f, r, g, [x for x in g if x >= first]) for v, (f, r, g, first) in VARIANTS.items()}
# τ 0.1's transition spans two decades, so 4 per decade already puts >= 6 points in it: its
# other seeds skip the midpoints (seed 0 has them).
VARIANTS["rpo τ=0.1"] = VARIANTS["rpo τ=0.1"][:3] + ([x for x in grid(1e-7, 13) if x >= 1.8e-7],)
# 16 pairs per step: 2 per decade of the 4-per-decade grid. Sketch: its own grids, wider (its
# scorer asks for the shape only, which DPO keeps to the top of its grid).
BATCH16 = {"dpo": grid(1e-7)[1::2], "rpo τ=0.5": grid(3.2e-7, 10)[1::2]}
SKETCH = {"dpo": grid(1e-7, 11), "rpo τ=0.5": grid(3.2e-7, 13), "sft": grid(1e-5, 6, 2)}
ROW_DEFAULTS = dict(tau=None, weighting="outside", embed="mean", batch=8, style_name="winter")
COLLAPSE, UNCHANGED = 0.05, (0.1, 0.05)  # content <= 0.05; style within +0.1 and content within -0.05 of the base


CUSTOM = {}  # --variant: name -> (lrs, seeds); then the study is these alone


def jobs():
    """The study in priority order: seed 0 of everything, then the seeds that carry the DPO/RPO
    comparison, the batch-size point, the second style, the remaining seeds. With --variant: those
    variants × their lrs × seeds, 8 pairs, winter."""
    if CUSTOM:
        return [(v, lr, s, 8, "winter") for v, (lrs_, seeds) in CUSTOM.items() for s in seeds for lr in lrs_]
    out = [(v, lr, 0, 8, "winter") for v in VARIANTS for lr in VARIANTS[v][2]]
    main = ["dpo", "rpo τ=0.1", "rpo τ=0.5", "rpo τ=1"]
    out += [(v, lr, s, 8, "winter") for s in (1, 2) for v in main for lr in VARIANTS[v][3]]
    out += [(v, lr, 0, 16, "winter") for v in BATCH16 for lr in BATCH16[v]]
    out += [(v, lr, 0, 8, "sketch") for v in SKETCH for lr in SKETCH[v]]
    out += [(v, lr, s, 8, "winter") for s in (1, 2) for v in VARIANTS if v not in main for lr in VARIANTS[v][3]]
    return out


def run_dir(runs, variant, lr, seed, batch, style):
    return os.path.join(runs, "frontier", style, f"B{batch}", E.slug(variant), f"lr{lr:g}", f"seed{seed}")


def claim(path):
    """Take a job: create path/claim (atomic). A claim whose process is gone is taken over."""
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, "claim")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(open(lock).read() or 0)
                os.kill(pid, 0)
                return False  # another live process has it
            except (ProcessLookupError, ValueError):
                os.remove(lock)  # its process is gone: take it over
            except PermissionError:
                return False
    return False


def scorer(args, scorers, style):
    if style not in scorers:
        scorers[style] = toy_scorer.load_toy_scorer(style, 16, cache=os.path.join(args.runs, f"toy_scorer_{style}.safetensors"))[0]
    return scorers[style]


def save_score(path, score):
    tmp = os.path.join(path, "score.json.tmp")
    json.dump(score, open(tmp, "w"))
    os.replace(tmp, os.path.join(path, "score.json"))


def pretrained_base(args, style):
    """The style's toy base (toy/experiment.py's recipe), pretrained now unless cached or shipped."""
    base = os.path.join(args.runs, "base" if style == "winter" else f"base-{style}")
    E.pretrain_base(base, args.device, args.base_steps, style)
    same_as_before(os.path.join(args.runs, "frontier", style, "base_id.json"), E.base_id(base), f"the {style} base")
    return base


def same_as_before(path, value, what):
    """Runs in one frontier folder must share a base and sampling settings: the first process records
    them, a later one with others stops in one line instead of mixing results silently."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + f".{os.getpid()}", "w") as f:
            json.dump(value, f)
        os.replace(path + f".{os.getpid()}", path)  # (whole, for a second worker reading it now)
    if json.load(open(path)) != value:
        raise SystemExit(f"frontier: {path} says its runs were made with {what} = {json.load(open(path))}, "
                         f"not {value}; use another --runs")


def score_base(args, scorers, seed, style):
    """The base itself, scored on the sampling seeds a run with this training seed uses: the
    'no change' point every lr path starts from."""
    path = os.path.join(args.runs, "frontier", style, "base", f"seed{seed}")
    if not os.path.exists(os.path.join(path, "score.json")) and claim(path):
        base = pretrained_base(args, style)
        save_score(path, E.score_unet(os.path.join(base, "unet"), toy.toy_prompts("test"),
                                      E.sampling_seeds(seed, SAMPLE_SEEDS), args, scorer(args, scorers, style)))
        os.remove(os.path.join(path, "claim"))


def run_job(args, scorers, variant, lr, seed, batch, style):
    path = run_dir(args.runs, variant, lr, seed, batch, style)
    if os.path.exists(os.path.join(path, "score.json")) or not claim(path):
        return False
    base = pretrained_base(args, style)
    t0 = time.time()
    flags = VARIANTS[variant][0]
    train.main(["--model", "tiny", "--data", "toy", "--style", style, "--batch_size", str(batch),
                "--max_steps", str(STEPS), *flags, "--embed_model", "toy-clip", "--init", os.path.join(base, "unet"),
                "--lr", str(lr), "--seed", str(seed), "--save_every", str(STEPS), "--keep_checkpoints", "1",
                "--out_dir", os.path.join(path, "run"), "--device", args.device, "--no_progress",
                "--log_every", str(STEPS), "--overwrite"])
    score = E.score_unet(os.path.join(path, "run", "unet"), toy.toy_prompts("test"),
                         E.sampling_seeds(seed, SAMPLE_SEEDS), args, scorer(args, scorers, style))
    score["train_s"] = round(time.time() - t0, 1)
    save_score(path, score)
    os.remove(os.path.join(path, "claim"))
    print(f"frontier: {style} B={batch} {variant} lr={lr:g} seed={seed}: style {score['style']:.3f} "
          f"content {score['content']:.3f} ({score['train_s']:.0f}s)", flush=True)
    return True


def rows(runs):
    """Every finished run as a JSON row (method, τ, weighting, embed, batch, style, lr, seed, scores)."""
    out = []
    for variant, lr, seed, batch, style in jobs():
        path = os.path.join(run_dir(runs, variant, lr, seed, batch, style), "score.json")
        if os.path.exists(path):
            s = json.load(open(path))
            out.append({"variant": variant, **ROW_DEFAULTS, **VARIANTS[variant][1], "batch": batch, "style_name": style,
                        "lr": lr, "seed": seed, "style": s["style"], "content": s["content"]})
    return out


BASES = (("winter", 0), ("winter", 1), ("winter", 2), ("sketch", 0))  # (style, training seed) the runs need


def bases(runs):
    """{(style, seed): the base's score on that seed's sampling seeds} for those scored so far."""
    out = {}
    for style, seed in BASES:
        path = os.path.join(runs, "frontier", style, "base", f"seed{seed}", "score.json")
        if os.path.exists(path):
            s = json.load(open(path))
            out[(style, seed)] = {"style": s["style"], "content": s["content"]}
    return out


def span(points, base):
    """How densely one seed's lr path covers the method's transition: (the last lr that left the
    base unchanged before the first that moved it, the first lr after that whose content is
    <= COLLAPSE, the number of grid points strictly between them). None where there is none."""
    pts = sorted(points)
    same = [(s - base["style"] < UNCHANGED[0]) and (base["content"] - c < UNCHANGED[1]) for _, s, c in pts]
    moved = same.index(False) if False in same else len(pts)
    if moved == 0 or moved == len(pts):
        return None, None, None
    hit = next((i for i in range(moved, len(pts)) if pts[i][2] <= COLLAPSE), None)
    return pts[moved - 1][0], (None if hit is None else pts[hit][0]), (None if hit is None else hit - moved)


def content_at(points, target):
    """points [(lr, style, content)] of one seed: content where the lr path first crosses `target`
    style, linearly interpolated between the two grid points around it; None if it never does."""
    pts = sorted(points)
    for (_, s0, c0), (_, s1, c1) in zip(pts, pts[1:]):
        if s0 <= target <= s1 and s1 > s0:
            return c0 + (c1 - c0) * (target - s0) / (s1 - s0)
    return None


def mean_ci(values):
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (float(v.mean()), None) if len(v) else (None, None)
    return float(v.mean()), float(T975.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v)))


def matched(table, variant, target, batch=8, style="winter"):
    """{seed: content at the target style} for one variant."""
    per_seed = {}
    for r in table:
        if r["variant"] == variant and r["batch"] == batch and r["style_name"] == style:
            per_seed.setdefault(r["seed"], []).append((r["lr"], r["style"], r["content"]))
    return {s: c for s, pts in per_seed.items() if (c := content_at(pts, target)) is not None}


def fmt(mc):
    m, ci = mc
    return "n/a" if m is None else (f"{m:+.3f}" if ci is None else f"{m:+.3f} ± {ci:.3f}")


def analysis(table, base=None):
    """The markdown summary: content at matched style per variant, RPO - DPO per seed, and (with
    the base's scores) how many grid points each lr path has between 'no change' and collapse."""
    lines = ["| variant | " + " | ".join(f"content at style {t}" for t in TARGETS) + " |",
             "|---|" + "---|" * len(TARGETS)]
    best = {}
    for v in VARIANTS:
        cells = []
        for t in TARGETS:
            per_seed = matched(table, v, t)
            m, ci = mean_ci(list(per_seed.values()))
            cells.append("n/a" if m is None else f"{m:.3f}" + ("" if ci is None else f" ± {ci:.3f}") + f" (n={len(per_seed)})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "RPO - DPO, content at matched style (per seed, paired; mean ± 95% t-interval over seeds):", "",
              "| variant | " + " | ".join(f"style {t}" for t in TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for v in VARIANTS:
        if v in ("dpo", "sft"):
            continue
        cells = []
        for t in TARGETS:
            a, b = matched(table, v, t), matched(table, "dpo", t)
            diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
            cells.append(fmt(mean_ci(diffs)) + f" (n={len(diffs)})")
            if v in ("rpo τ=0.1", "rpo τ=0.5", "rpo τ=1") and len(diffs) >= 2:
                best.setdefault(t, []).append((float(np.mean(diffs)), v, mean_ci(diffs)))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    for t, cands in best.items():  # (picked after the fact among three temperatures: an optimistic choice)
        m, v, mc = max(cands)
        lines.append(f"Best RPO temperature at style {t}: {v}, content {fmt(mc)} against DPO.")
    for batch, style in ((16, "winter"), (8, "sketch")):
        for t in TARGETS:
            a, b = matched(table, "rpo τ=0.5", t, batch, style), matched(table, "dpo", t, batch, style)
            if a and b:
                lines.append(f"\n{batch} pairs/step, {style}, style {t} (seed 0): content rpo τ=0.5 {a[0]:.3f}, "
                             f"dpo {b[0]:.3f}, difference {a[0] - b[0]:+.3f}")
    if base:
        lines += ["", f"Grid coverage, 8 pairs/step winter: last lr with the base unchanged (style < base + "
                  f"{UNCHANGED[0]}, content > base - {UNCHANGED[1]}) → first lr collapsed (content <= {COLLAPSE}): "
                  "grid points strictly between", "", "| variant | seed 0 | seed 1 | seed 2 |", "|---|---|---|---|"]
        for v in VARIANTS:
            cells = []
            for seed in (0, 1, 2):
                pts = [(r["lr"], r["style"], r["content"]) for r in table if r["variant"] == v and r["seed"] == seed
                       and r["batch"] == 8 and r["style_name"] == "winter"]
                lo, hi, n = span(pts, base[("winter", seed)]) if pts and ("winter", seed) in base else (None,) * 3
                cells.append("n/a" if lo is None else f"{lo:g} → {'none' if hi is None else f'{hi:g}'}: "
                             f"{'n/a' if n is None else n}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table, out_png, base=None):
    plt = plots.pyplot()
    panels = [("winter, 8 pairs/step, mean ± std over seeds", 8, "winter"), ("16 pairs/step (seed 0)", 16, "winter"),
              ("sketch (seed 0)", 8, "sketch")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), dpi=100)
    for ax, (title, batch, style) in zip(axes, panels):
        for i, v in enumerate(VARIANTS):
            by_lr = {}
            for r in table:
                if r["variant"] == v and r["batch"] == batch and r["style_name"] == style:
                    by_lr.setdefault(r["lr"], []).append((r["style"], r["content"]))
            if not by_lr:
                continue
            lrs = sorted(by_lr)
            pts = [np.array(by_lr[lr]) for lr in lrs]
            sm, cm = [p[:, 0].mean() for p in pts], [p[:, 1].mean() for p in pts]
            ss = [p[:, 0].std(ddof=1) if len(p) > 1 else 0 for p in pts]
            cs = [p[:, 1].std(ddof=1) if len(p) > 1 else 0 for p in pts]
            ax.errorbar(sm, cm, xerr=ss, yerr=cs, fmt="o-", ms=3, capsize=2, color=f"C{i}", label=v, alpha=0.85)
        b = [base[k] for k in (base or {}) if k[0] == style and (batch == 8 and style == "winter" or k[1] == 0)]
        if b:  # the base, on the same sampling seeds: where every lr path starts
            ax.plot(np.mean([x["style"] for x in b]), np.mean([x["content"] for x in b]), "k*", ms=12, label="base")
        ax.set_title(title)
        ax.set_xlabel("style (share of samples in the preferred style)")
        ax.set_ylabel("content (share showing the prompt)")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 0.6 if style == "winter" else 1.0)  # (the sketch scorer asks for the shape only)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def matched_grid(runs, table, out_dir, target=0.7, variants=("sft", "dpo", "rpo τ=0.1", "rpo τ=0.5", "rpo τ=1")):
    """Samples at matched style: per variant the seed-0 run at the first lr whose style reaches
    `target` (where the lr path crosses it, as in the matched-style comparison), on the 12
    held-out prompts (sampling seed 0) -> grid.png (rows: base, then those runs) and grid.txt."""
    import sample
    from model import tensor_to_uint8
    prompts, args = toy.toy_prompts("test"), argparse.Namespace(sample_steps=25, guidance=5.0, device="cpu")
    rows = [("base", os.path.join(runs, "base", "unet"))]
    for v in variants:
        cands = [r for r in table if r["variant"] == v and r["seed"] == 0 and r["batch"] == 8
                 and r["style_name"] == "winter" and r["style"] >= target]
        if cands:
            r = min(cands, key=lambda r: r["lr"])
            rows.append((f"{v} lr={r['lr']:g} (style {r['style']:.2f}, content {r['content']:.2f})",
                         os.path.join(run_dir(runs, v, r["lr"], 0, 8, "winter"), "run", "unet")))
    images = [E.sample_unet(unet, prompts, [0], args) for _, unet in rows]
    import torch
    sample.make_grid(tensor_to_uint8(torch.cat(images)), rows=len(rows), cols=len(prompts), scale=4).save(
        os.path.join(out_dir, "grid.png"))
    with open(os.path.join(out_dir, "grid.txt"), "w") as f:
        f.write("rows: " + "; ".join(label for label, _ in rows) + "\ncolumns: " + " | ".join(prompts) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="where the bases and runs are cached (shared with toy/experiment.py)")
    p.add_argument("--out", default="results/toy-study", help="--collect writes frontier.{json,md,png} here")
    p.add_argument("--collect", action="store_true", help="only collect finished runs into the table and plot")
    p.add_argument("--base_steps", type=int, default=1200)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", action="append", default=None, metavar="NAME='TRAIN FLAGS'",
                   help="as toy.experiment: a name and any train.py flags (repeatable); the study is then these "
                        "variants × --lrs × --seeds (rows named by the variant)")
    p.add_argument("--lrs", default=None, help="with --variant: comma list of learning rates")
    p.add_argument("--seeds", default=None, help="with --variant: comma list of training seeds (default 0)")
    args = p.parse_args(argv)
    if args.variant:  # the experiment runner's rules and checks (train.py's parser sees the flags first)
        custom = E.parse_args([x for v in args.variant for x in ("--variant", v)] + [
            "--lrs", args.lrs or "1e-6", "--seeds", args.seeds or "0"])
        study = E.STUDIES["custom"]
        for name, flags in custom.custom.items():
            VARIANTS[name] = (flags, dict(method=name), study["lrs"], study["lrs"])
            CUSTOM[name] = (study["lrs"], study["seeds"])
    elif args.lrs or args.seeds:
        p.error("--lrs and --seeds go with --variant")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = {k: getattr(args, k) for k in ("base_steps", "sample_steps", "guidance", "device")}
    same_as_before(os.path.join(args.runs, "frontier", "settings.json"), settings, "the flags")
    scorers, done = {}, 0
    if not args.collect:
        for job in jobs():
            done += run_job(args, scorers, *job)
        print(f"frontier: this process ran {done} jobs")
    for style, seed in BASES:  # (a minute at most; --collect scores them too if missing)
        score_base(args, scorers, seed, style)
    table, base = rows(args.runs), bases(args.runs)
    os.makedirs(args.out, exist_ok=True)
    json.dump({"steps": STEPS, "sample_seeds": SAMPLE_SEEDS, "held_out_prompts": len(toy.toy_prompts("test")),
               "base_recipe": E.BASE_ARGS, "embed_model": "toy-clip", "rows": table,
               "base": [{"style_name": st, "seed": sd, **sc} for (st, sd), sc in base.items()]},
              open(os.path.join(args.out, "frontier.json"), "w"), indent=1)
    text = analysis(table, base)
    open(os.path.join(args.out, "frontier.md"), "w").write(text)
    plot(table, os.path.join(args.out, "frontier.png"), base)
    matched_grid(args.runs, table, args.out)
    print(text + f"\n{len(table)} of {len(jobs())} runs; wrote {args.out}/frontier.{{json,md,png}}")


if __name__ == "__main__":
    main()
