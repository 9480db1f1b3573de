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
scored the same way, on each training seed's sampling seeds. A run's folder is named by what made
it and its score is keyed by its weights' bytes (toy/experiment.py: experiment.run_name,
experiment.scored); a rerun skips what exists, and two processes claim jobs with a lock file
each, so the study resumes where it stopped. toy/factorial.py runs its study with these pieces.

The comparison: along each seed's lr grid, content is interpolated linearly at a target style
(0.6, 0.7, 0.8); the RPO - DPO difference is taken per seed (same seed: same data order and
noise) and reported as mean ± a 95% t-interval over the seeds.
"""
import argparse
import functools
import json
import math
import os
import time

import numpy as np

from plumbing import plots
from plumbing import toy_scorer
from toy import experiment as E
import loss as L
from plumbing.images import tensor_to_uint8, toy_prompts
import sample
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
ROW_DEFAULTS = dict(tau=None, weighting="outside", embed="mean", timesteps=None, batch=8, style_name="winter")
COLLAPSE, UNCHANGED = 0.05, (0.1, 0.05)  # content <= 0.05; style within +0.1 and content within -0.05 of the base


CUSTOM = {}  # --variant: name -> (lrs, seeds); then the study is these alone
OTHER = {}  # other studies' variants, run with these pieces (toy/factorial.py's arms): name -> (flags, row fields)


def spec(variant):
    """A variant's (train.py flags, fields of its JSON rows): this study's or another's (OTHER)."""
    return VARIANTS[variant][:2] if variant in VARIANTS else OTHER[variant]


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


def run_dir(runs, variant, lr, seed, batch, style, made):
    """A job's folder, named by what made its run (experiment.run_name: command, base, data, code):
    another command, base or code is another folder, and never overwrites this one."""
    return os.path.join(runs, "frontier", style, f"B{batch}", E.slug(variant), f"lr{lr:g}", f"seed{seed}",
                        E.run_name(made))


def base_dir(runs, style):
    return os.path.join(runs, "base" if style == "winter" else f"base-{style}")


def command(runs, variant, lr, seed, batch, style, device):
    """A job's train.py command, less --out_dir."""
    return ["--model", "tiny", "--data", "toy", "--style", style, "--batch_size", str(batch), "--max_steps", str(STEPS),
            *spec(variant)[0], "--embed_model", "toy-clip", "--init", os.path.join(base_dir(runs, style), "unet"),
            "--lr", str(lr), "--seed", str(seed), "--save_every", str(STEPS), "--keep_checkpoints", "1",
            "--device", device, "--no_progress", "--log_every", str(STEPS)]


def job(runs, device, variant, lr, seed, batch, style):
    """-> (the job's folder, what made its run, its command less --out_dir); None before its base exists."""
    base = base_dir(runs, style)
    if not os.path.exists(os.path.join(base, "unet", "diffusion_pytorch_model.safetensors")):
        return None
    argv = command(runs, variant, lr, seed, batch, style, device)
    made = E.made_from(argv, base_id(base))
    return run_dir(runs, variant, lr, seed, batch, style, made), made, argv


@functools.lru_cache(maxsize=None)
def _base_id(path, mtime):
    return E.base_id(path)


def base_id(base):
    """experiment.base_id, once per version of the base's file (a study asks at every job)."""
    return _base_id(base, os.path.getmtime(os.path.join(base, "unet", "diffusion_pytorch_model.safetensors")))


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
    """The style's toy scorer (the shipped one where it fits: plumbing/toy_scorer.py)."""
    if style not in scorers:
        scorers[style] = toy_scorer.load_toy_scorer(style, 16, cache=os.path.join(args.runs, f"toy_scorer_{style}.safetensors"))[0]
    return scorers[style]


def score(args, scorers, unet, seed, style, lookup_only=False):
    """A UNet's score on the held-out prompts × this seed's sampling seeds, from the score store
    keyed by its weights' bytes (experiment.scored) -> (score or None, reused)."""
    net = None if lookup_only else scorer(args, scorers, style)
    return E.scored(args.runs, unet, toy_prompts("test"), E.sampling_seeds(seed, SAMPLE_SEEDS), args, net,
                    toy_scorer.identity(style, 16), lookup_only=lookup_only)


def pretrained_base(args, style):
    """The style's toy base (toy/experiment.py's recipe), pretrained now unless cached or shipped."""
    base = base_dir(args.runs, style)
    E.pretrain_base(base, args.device, args.base_steps, style)
    return base


def score_base(args, scorers, seed, style):
    """The base itself, scored on the sampling seeds a run with this training seed uses: the
    'no change' point every lr path starts from."""
    base = pretrained_base(args, style)
    score(args, scorers, os.path.join(base, "unet"), seed, style)


def run_job(args, scorers, variant, lr, seed, batch, style):
    """Train and score one job unless its run and score exist (or another worker has claimed it)
    -> whether this process did any work."""
    pretrained_base(args, style)
    path, made, argv = job(args.runs, args.device, variant, lr, seed, batch, style)
    unet, record = os.path.join(path, "run", "unet"), os.path.join(path, "made_from.json")
    finished = os.path.exists(record) and json.load(open(record)) == made
    if finished and score(args, scorers, unet, seed, style, lookup_only=True)[0] is not None:
        return False
    if not claim(path):
        return False
    t0 = time.time()
    if not finished:
        train.main(argv + ["--out_dir", os.path.join(path, "run"), "--overwrite"])
        with open(record, "w") as f:
            json.dump(made, f)
    result = score(args, scorers, unet, seed, style)[0]
    os.remove(os.path.join(path, "claim"))
    print(f"frontier: {style} B={batch} {variant} lr={lr:g} seed={seed}: style {result['style']:.3f} "
          f"content {result['content']:.3f} ({time.time() - t0:.0f}s; {path})", flush=True)
    return True


def rows(args, job_list=None):
    """Every finished, scored run of the study (default: jobs()) as a JSON row (method, τ,
    weighting, embed, timesteps, batch, style, lr, seed, scores)."""
    out = []
    for variant, lr, seed, batch, style in (jobs() if job_list is None else job_list):
        found = job(args.runs, args.device, variant, lr, seed, batch, style)
        if found is None or not os.path.exists(os.path.join(found[0], "made_from.json")):
            continue
        s = score(args, {}, os.path.join(found[0], "run", "unet"), seed, style, lookup_only=True)[0]
        if s is not None:
            fields = {**ROW_DEFAULTS, **spec(variant)[1]}
            if fields["timesteps"] is None and fields["method"] in L.OBJECTIVES:  # the objective's default (E8)
                fields["timesteps"] = L.OBJECTIVES[fields["method"]]["timesteps"]
            out.append({"variant": variant, **fields, "batch": batch, "style_name": style,
                        "lr": lr, "seed": seed, "style": s["style"], "content": s["content"]})
    return out


BASES = (("winter", 0), ("winter", 1), ("winter", 2), ("sketch", 0))  # (style, training seed) the runs need


def bases(args, which=BASES):
    """{(style, seed): the base's score on that seed's sampling seeds} for those scored so far."""
    out = {}
    for style, seed in which:
        unet = os.path.join(base_dir(args.runs, style), "unet")
        s = score(args, {}, unet, seed, style, lookup_only=True)[0] if os.path.isdir(unet) else None
        if s is not None:
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


def matched_grid(args, table, out_dir, target=0.7, variants=("sft", "dpo", "rpo τ=0.1", "rpo τ=0.5", "rpo τ=1"),
                 name="grid"):
    """Samples at matched style: per variant the seed-0 run at the first lr whose style reaches
    `target` (where the lr path crosses it, as in the matched-style comparison), on the 12
    held-out prompts (sampling seed 0) -> NAME.png (rows: base, then those runs) and NAME.txt."""
    prompts = toy_prompts("test")
    rows = [("base", os.path.join(base_dir(args.runs, "winter"), "unet"))]
    for v in variants:
        cands = [r for r in table if r["variant"] == v and r["seed"] == 0 and r["batch"] == 8
                 and r["style_name"] == "winter" and r["style"] >= target]
        if cands:
            r = min(cands, key=lambda r: r["lr"])
            rows.append((f"{v} lr={r['lr']:g} (style {r['style']:.2f}, content {r['content']:.2f})",
                         os.path.join(job(args.runs, args.device, v, r["lr"], 0, 8, "winter")[0], "run", "unet")))
    images = [E.sample_unet(unet, prompts, [0], args) for _, unet in rows]
    import torch
    sample.make_grid(tensor_to_uint8(torch.cat(images)), rows=len(rows), cols=len(prompts), scale=4).save(
        os.path.join(out_dir, f"{name}.png"))
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
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
    E.check_places(p, args)
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
    scorers, done = {}, 0
    if not args.collect:
        for one in jobs():
            done += run_job(args, scorers, *one)
        print(f"frontier: this process ran {done} jobs")
    for style, seed in BASES:  # (a minute at most; --collect scores them too if missing)
        score_base(args, scorers, seed, style)
    table, base = rows(args), bases(args)
    os.makedirs(args.out, exist_ok=True)
    json.dump({"steps": STEPS, "sample_seeds": SAMPLE_SEEDS, "held_out_prompts": len(toy_prompts("test")),
               "base_recipe": E.BASE_ARGS, "embed_model": "toy-clip", "rows": table,
               "base": [{"style_name": st, "seed": sd, **sc} for (st, sd), sc in base.items()]},
              open(os.path.join(args.out, "frontier.json"), "w"), indent=1)
    text = analysis(table, base)
    open(os.path.join(args.out, "frontier.md"), "w").write(text)
    plot(table, os.path.join(args.out, "frontier.png"), base)
    matched_grid(args, table, args.out)
    print(text + f"\n{len(table)} of {len(jobs())} runs; wrote {args.out}/frontier.{{json,md,png}}")


if __name__ == "__main__":
    main()
