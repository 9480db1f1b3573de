"""
evaluate.py's and the toy study's figures (matplotlib, Agg: files only, no display needed):
training curves from metrics.jsonl, style-content trade-offs, reward bar charts with win rates.
"""
import os
import sys

import numpy as np

from plumbing.report import read_metrics  # (cut or unreadable lines dropped, with a warning)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib")
    return plt

def finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def plot_curves(runs, out_png, style_points=None):
    """runs {label: run_dir with train.py's metrics.jsonl}; style_points {label: [(step, score)]}.
    Saves a 1500x400 px PNG: loss, implicit accuracy and style score against the step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for i, (label, run_dir) in enumerate(runs.items()):
        path, colour = os.path.join(run_dir, "metrics.jsonl"), f"C{i}"
        if not os.path.isfile(path):
            raise SystemExit(f"error: {run_dir}: no metrics.jsonl (not a train.py output folder?)")
        records = read_metrics(path, log=lambda line: print(line, file=sys.stderr))
        # a loss that is NaN, Infinity (json reads both) or text is not plotted: counted, and said
        log = [r for r in records if finite_number(r.get("loss"))]
        if len(log) < len(records):
            print(f"warning: {path}: skipped {len(records) - len(log)} of {len(records)} steps whose loss is not a "
                  f"finite number", file=sys.stderr)
        if not log:
            raise SystemExit(f"error: {path}: no step with a finite loss ({len(records)} steps read); nothing to plot")
        steps, loss = np.array([r["step"] for r in log]), np.array([r["loss"] for r in log])
        # Per-step losses are noisy (one t and ε draw per step): show a 20-step moving average.
        w = min(20, len(loss))
        axes[0].plot(steps, loss, color=colour, alpha=0.2, lw=0.8)
        axes[0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), color=colour, label=label)
        acc = [(r["step"], r["implicit_acc"]) for r in log if finite_number(r.get("implicit_acc"))]  # none for SFT
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
    plt = pyplot()
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

def plot_scores(runs, metrics, out_png, win_rates=None):
    """Reward metrics as bars: one panel per metric (their scales differ), one bar per folder at
    its mean with the std over images as error bar; the panel title carries the win rate(s)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.5), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means = [r["metrics"][m]["mean"] for r in runs]
        stds = [r["metrics"][m]["std"] for r in runs]
        ax.bar(range(len(runs)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), [r["label"] for r in runs], rotation=20, fontsize=8)
        title = m
        for label, w in (win_rates or {}).items():
            title += f"\n{label} wins {w[m]['win_rate']:.2f} [{w[m]['ci95'][0]:.2f}, {w[m]['ci95'][1]:.2f}]"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
