"""
The factorial toy study: which of RPO's two differences from DPO moves content at matched style?

Two workers share the jobs and a rerun resumes: export OMP_NUM_THREADS=1; python -m toy.factorial &
python -m toy.factorial; wait. Then python -m toy.factorial --collect writes the tables, the plot and
the sample grid: results/toy-study/factorial.{json,md,png}, factorial_grid.png.

At their defaults RPO and DPO differ in two ways: RPO weights every winner against every loser
of the micro-batch by ω (E4-E7), and draws one t per micro-batch where DPO draws one per pair
(E8: --timesteps batch | pair). This study crosses them, so each factor is seen with the other
held fixed:

    objective            × E8's t sampling
    DPO                    one t per micro-batch (batch)
    RPO outside, τ 0.5     one t per pair (pair)
    RPO inside, τ 0.5

on the toy winter style (training seeds 0-4) and sketch style (seeds 0-2), from the shipped
bases, with toy/frontier.py's runs (150 steps × 8 pairs, 12 held-out prompts × 8 sampling
seeds, toy-clip for E5) and its matched-style comparison: along each seed's lr path, content is
interpolated where the style first crosses 0.6, 0.7, 0.8; differences are paired by seed (the
same seed gives both arms the same data order and the same draws of noise) and reported as mean
± a 95% t-interval over the seeds.

The lr grid of an arm (4 points a decade) is planned around its transition from the runs made so
far: seed 0 starts from the arm's GRID and grows it a point at a time, downward while its lowest
point already shows style >= 0.6 and upward while its highest shows style <= 0.8; every other seed
runs the points of seed 0's grid from the last below style 0.6 to the first above 0.8 (a seed
whose path is shifted may then not bracket 0.6 or 0.8: it counts where it does). The study's jobs are listed in priority order (winter seed 0,
winter seeds 1-2, sketch seed 0, winter seeds 3-4, sketch seeds 1-2) and re-planned after every
job, so two workers started together share the work and a rerun resumes where it stopped.
"""
import argparse
import json
import os
import time

import numpy as np

from plumbing import plots
from toy import experiment as E
from toy import frontier as F
from plumbing.images import toy_prompts

# The arms: name -> (train.py flags, fields of its JSON rows)
OBJECTIVES = {"dpo": (["--loss", "dpo"], dict(method="dpo")),
              "rpo outside": (["--loss", "rpo", "--tau", "0.5"], dict(method="rpo", tau=0.5)),
              "rpo inside": (["--loss", "rpo", "--tau", "0.5", "--rpo_weighting", "inside"],
                             dict(method="rpo", tau=0.5, weighting="inside"))}
TIMESTEPS = ("batch", "pair")
ARMS = {f"{o} t={t}": (flags + ["--timesteps", t], dict(fields, timesteps=t))
        for o, (flags, fields) in OBJECTIVES.items() for t in TIMESTEPS}
# Seed 0's starting grid per objective (4 a decade), from the frontier study: DPO and RPO inside
# move from style ~0.45 to ~0.9 between 3.2e-7 and 3.2e-6; RPO outside between 1.8e-6 and 1.8e-5.
LADDER = F.grid(1e-8, 20)  # 1e-8 .. 5.6e-4: where a grid may grow to
GRID = {"dpo": LADDER[6:11], "rpo outside": LADDER[9:14], "rpo inside": LADDER[6:11]}  # 3.2e-7.., 1.8e-6..
SEEDS = {"winter": (0, 1, 2, 3, 4), "sketch": (0, 1, 2)}
LOW, HIGH = 0.6, 0.8  # the matched styles' range (F.TARGETS' ends): a grid must bracket it
F.OTHER.update(ARMS)  # (toy/frontier.py's run_job and rows read an arm's flags and fields there)


def objective(arm):
    return arm.split(" t=")[0]


def grown(styles, lrs):
    """A seed's lrs: `lrs`, grown one LADDER point at a time at an end whose run shows the transition
    is beyond it, until the seed's styles bracket LOW..HIGH. styles: {lr: style} of its finished runs."""
    lrs = list(lrs)
    while lrs[0] in styles and styles[lrs[0]] >= LOW and LADDER.index(lrs[0]) > 0:
        lrs.insert(0, LADDER[LADDER.index(lrs[0]) - 1])
    while lrs[-1] in styles and styles[lrs[-1]] <= HIGH and LADDER.index(lrs[-1]) < len(LADDER) - 1:
        lrs.append(LADDER[LADDER.index(lrs[-1]) + 1])
    return lrs


def other_lrs(styles, lrs):
    """The other seeds' lrs: seed 0's from the last with style < LOW to the first with style > HIGH
    (all of them where it never crosses). None until seed 0's grid has run."""
    done = [lr for lr in lrs if lr in styles]
    if len(done) < len(lrs):
        return None
    below = [i for i, lr in enumerate(lrs) if styles[lr] < LOW]
    above = [i for i, lr in enumerate(lrs) if styles[lr] > HIGH]
    lo = max(below) if below else 0
    hi = next((i for i in above if i > lo), len(lrs) - 1)
    return lrs[lo:hi + 1]


def plan(args):
    """The study's jobs (arm, lr, seed, 8, style) in priority order, from what has run so far: seed 0's
    grid around each arm's transition; each other seed starts from seed 0's points across LOW..HIGH
    and grows its own grid where its transition lies elsewhere (a seed that learns the style slower
    or faster than seed 0 would otherwise never cross the matched styles)."""
    def styles_of(style, arm, seed):
        return {r["lr"]: r["style"] for r in F.rows(args, [(arm, lr, seed, 8, style) for lr in LADDER])}

    def seed0(style):
        out = {}
        for arm in ARMS:
            styles = styles_of(style, arm, 0)
            out[arm] = grown(styles, GRID[objective(arm)]), styles
        return out
    winter, sketch = seed0("winter"), seed0("sketch")
    jobs = []

    def add(style, seeds, first):
        for seed in seeds:
            for arm in ARMS:
                lrs, styles = first[arm]
                start = lrs if seed == 0 else other_lrs(styles, lrs)
                jobs.extend((arm, lr, seed, 8, style) for lr in (grown(styles_of(style, arm, seed), start) if start else []))
    add("winter", (0,), winter)
    add("winter", (1, 2), winter)
    add("sketch", (0,), sketch)
    add("winter", (3, 4), winter)
    add("sketch", (1, 2), sketch)
    return jobs


def table_md(rows, style):
    """Content at matched style per arm; then the paired differences that isolate each factor."""
    targets = F.TARGETS
    lines = [f"Content at matched style, {style} (mean ± 95% t-interval over training seeds; n = seeds whose lr path "
             f"crosses that style):", "", "| arm | " + " | ".join(f"style {t}" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for arm in ARMS:
        cells = []
        for t in targets:
            m, ci = F.mean_ci(list(F.matched(rows, arm, t, 8, style).values()))
            cells.append("n/a" if m is None else f"{m:.3f}" + ("" if ci is None else f" ± {ci:.3f}") +
                         f" (n={len(F.matched(rows, arm, t, 8, style))})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    pairs = [(f"weighting at t=batch: {o} − dpo", f"{o} t=batch", "dpo t=batch") for o in ("rpo outside", "rpo inside")]
    pairs += [(f"weighting at t=pair: {o} − dpo", f"{o} t=pair", "dpo t=pair") for o in ("rpo outside", "rpo inside")]
    pairs += [(f"t sampling, {o}: batch − pair", f"{o} t=batch", f"{o} t=pair") for o in OBJECTIVES]
    pairs += [("both at once (the defaults): rpo outside t=batch − dpo t=pair", "rpo outside t=batch", "dpo t=pair")]
    lines += ["", f"Paired differences in content at matched style, {style} (per seed; mean ± 95% t-interval):", "",
              "| difference | " + " | ".join(f"style {t}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for label, a, b in pairs:
        cells = []
        for t in targets:
            x, y = F.matched(rows, a, t, 8, style), F.matched(rows, b, t, 8, style)
            diffs = [x[s] - y[s] for s in sorted(set(x) & set(y))]
            cells.append(F.fmt(F.mean_ci(diffs)) + f" (n={len(diffs)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def lr_at(rows, arm, style, target=0.7):
    """{seed: the lr (log-interpolated) where the arm's style first crosses `target`}."""
    per_seed = {}
    for r in rows:
        if r["variant"] == arm and r["style_name"] == style:
            per_seed.setdefault(r["seed"], []).append((r["lr"], r["style"]))
    out = {}
    for seed, pts in per_seed.items():
        pts.sort()
        for (l0, s0), (l1, s1) in zip(pts, pts[1:]):
            if s0 <= target <= s1 and s1 > s0:
                out[seed] = float(10 ** (np.log10(l0) + (np.log10(l1) - np.log10(l0)) * (target - s0) / (s1 - s0)))
                break
    return out


def analysis(rows):
    lines = []
    for style in SEEDS:
        lines += table_md(rows, style) + [""]
    lines += ["lr where style first crosses 0.7 (log-interpolated; geometric mean over seeds, n):", "",
              "| arm | winter | sketch |", "|---|---|---|"]
    for arm in ARMS:
        cells = []
        for style in SEEDS:
            v = list(lr_at(rows, arm, style).values())
            cells.append("n/a" if not v else f"{float(np.exp(np.mean(np.log(v)))):.2g} (n={len(v)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, base, out_png):
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100)
    for ax, style in zip(axes, SEEDS):
        for i, arm in enumerate(ARMS):
            by_lr = {}
            for r in rows:
                if r["variant"] == arm and r["style_name"] == style:
                    by_lr.setdefault(r["lr"], []).append((r["style"], r["content"]))
            if by_lr:
                pts = [np.array(by_lr[lr]) for lr in sorted(by_lr)]
                ax.plot([p[:, 0].mean() for p in pts], [p[:, 1].mean() for p in pts], "o-" if "batch" in arm else "s--",
                        ms=3, color=f"C{list(OBJECTIVES).index(objective(arm))}", label=arm, alpha=0.85)
        for (st, seed), b in base.items():
            if st == style:
                ax.plot([b["style"]], [b["content"]], "k*", ms=9, label="base" if seed == 0 else None)
        for t in F.TARGETS:
            ax.axvline(t, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{style}: mean over seeds at each lr\n(solid: one t per micro-batch; dashed: one t per pair)")
        ax.set_xlabel("style (share of samples called styled)")
        ax.set_ylabel("content (share showing the prompt)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--runs", default="runs", help="where the bases, runs and scores are cached (shared with toy.frontier)")
    p.add_argument("--out", default="results/toy-study", help="--collect writes factorial.{json,md,png} here")
    p.add_argument("--collect", action="store_true", help="only collect the finished runs into the tables and plot")
    p.add_argument("--max_jobs", type=int, default=None, help="stop this worker after this many jobs")
    p.add_argument("--base_steps", type=int, default=1200)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    E.check_places(p, args)  # (toy.experiment's checks: counts, --guidance, --runs, --out)
    return args


def main(argv=None):
    args = parse_args(argv)
    scorers, done = {}, 0
    while not args.collect and (args.max_jobs is None or done < args.max_jobs):
        # one job at a time, re-planned after each: seed 0's results decide the other seeds' grids
        jobs = plan(args)
        if any(F.run_job(args, scorers, *one) for one in jobs):
            done += 1
        elif len(F.rows(args, jobs)) < len(jobs):  # the rest is another worker's, now:
            time.sleep(20)  # its results may open more of the plan
        else:
            break
    if not args.collect:
        print(f"factorial: this process ran {done} jobs")
    which = [(style, seed) for style, seeds in SEEDS.items() for seed in seeds]
    for style, seed in which:
        F.score_base(args, scorers, seed, style)
    jobs = plan(args)
    rows, base = F.rows(args, jobs), F.bases(args, which)
    os.makedirs(args.out, exist_ok=True)
    json.dump({"steps": F.STEPS, "sample_seeds": F.SAMPLE_SEEDS, "held_out_prompts": len(toy_prompts("test")),
               "base_recipe": E.BASE_ARGS, "embed_model": "toy-clip", "code": E.code_id(), "arms": list(ARMS),
               "commands": {arm: ["python", "train.py", *F.command(args.runs, arm, 0.0, 0, 8, "winter", args.device)]
                            for arm in ARMS},
               "rows": rows, "base": [{"style_name": st, "seed": sd, **sc} for (st, sd), sc in base.items()],
               "planned_jobs": len(jobs)},
              open(os.path.join(args.out, "factorial.json"), "w"), indent=1)
    text = analysis(rows)
    open(os.path.join(args.out, "factorial.md"), "w").write(text)
    plot(rows, base, os.path.join(args.out, "factorial.png"))
    F.matched_grid(args, rows, args.out, variants=tuple(ARMS), name="factorial_grid")  # winter, seed 0, style 0.7
    print(text + f"\n{len(rows)} of {len(jobs)} planned runs; wrote {args.out}/factorial.{{json,md,png}}")


if __name__ == "__main__":
    main()
