"""
Evaluation: score sample folders, tabulate mean ± std, win rates, plot training curves.

    python evaluate.py --images out/tuned --baseline out/base --metrics pickscore,hps,imagereward,aesthetic,clip,style
    python evaluate.py --images out/rpo out/dpo --labels rpo,dpo --metrics toy_style,toy_content --style winter
    python evaluate.py --curves rpo=runs/rpo dpo=runs/dpo --out curves.png

Real images (section 2): reward models score every image of a sample.py folder, which records
prompt and seed per image in samples.jsonl. With --baseline, images pair up by (prompt, seed):
the same prompt and initial noise through two models. Printed: per metric, mean ± std over
images per folder and the win rate of each folder over the baseline with a bootstrap 95%
interval; written: results.json (per-image scores too) and a bar chart next to it. Metrics:
pickscore, hps, imagereward, aesthetic, clip, style (a CLIP zero-shot style probability,
reported with clip to the prompt: content kept); hps needs open_clip (requirements-eval.txt),
imagereward the ImageReward package.

What is read from a folder: only the images its samples.jsonl lists, and only if they lie inside
the folder (real paths, symlinks resolved: a listed '../x' or '/etc/x' is refused). Other files
there (grid.png, compare.png, notes) are ignored; a listed file that is not a readable image stops
the run with one line naming it, before any model loads: a score over fewer images than listed
would not be the folder's score, and win rates would pair different sets.

Toy part (Style Alignment on plumbing/images.py's procedural set, docs/method.md; metrics toy_style, toy_content,
...): a small CNN trained on procedural renders says, per image, whether the style shows (style
score) and whether the prompt's shape, colour and background are still there (content score).
It ships with the code (results/toy-study/scorer; for other settings trained once, cached) and refuses
to score unless its held-out accuracy is >= 0.95: a weak scorer would make every table meaningless.
"""
import argparse
import contextlib
import json
import os
import shlex
import sys

import numpy as np
import torch
from PIL import Image

from plumbing import files, hub, parallel, plots, rewards, toy_scorer
from plumbing.images import STYLES, image_to_tensor, tensor_to_uint8

# ----------------------------------------------------------------------------------------------
# 1. Reward models for real images
#
# Per image, each score follows the convention of the model's own release, so that numbers can
# be set next to published ones. cos(u, v) below is the cosine of the two embeddings, i.e. the
# dot product after L2 normalisation; "CLIP" means a transformers CLIPModel whose inputs are made
# by its transformers CLIPProcessor (AutoProcessor: a hub id or a local folder).
#   pickscore    PickScore_v1 (Kirstain et al. 2023, a CLIP ViT-H/14 fine-tuned on Pick-a-Pic),
#                preprocessed by the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor:
#                logit_scale.exp() · cos(text, image), as the PickScore repo's inference snippet.
#   clip         CLIP score with openai/clip-vit-large-patch14: max(100 · cos(text, image), 0), the
#                torchmetrics CLIPScore convention (Hessel et al. 2021 scale by 2.5 instead of 100).
#   aesthetic    LAION improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor):
#                the MLP head sac+logos+ava1-l14-linearMSE applied to the L2-normalised CLIP
#                ViT-L/14 image embedding; roughly a 1-10 rating.
#   style        Style Alignment on real images: CLIP zero-shot probability of the style text against
#                a neutral text, softmax over [style, neutral] of logit_scale.exp() · cos(image, text),
#                always reported next to `clip` to the prompt (does the content survive the style?).
#   hps          HPSv2 (Wu et al. 2023): open_clip's ViT-H-14 with the HPS v2.1 (or v2.0) checkpoint
#                from xswu/HPSv2, HPSv2's own preprocessing (rewards.hps_pixels) and open_clip's
#                tokenizer: 100 · cos(text, image), as its benchmark reports it (its hpsv2.score
#                returns the same without the factor 100). The hpsv2 package itself is not used.
#   imagereward  ImageReward-v1.0 (Xu et al. 2023) through the ImageReward package:
#                its score(prompt, images), the reward standardised by the package's mean and std.
# Every model is loaded once, before any image is read; CLIP ViT-L/14 serves clip, style and
# aesthetic alike; image and text features are computed in batches on --device.

REWARD_METRICS = ("pickscore", "hps", "imagereward", "aesthetic", "clip", "style")
REWARD_DEFAULTS = dict(
    pickscore_model="yuvalkirstain/PickScore_v1",
    pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    clip_model="openai/clip-vit-large-patch14",
    # The published head (a 4.5 MB state dict), downloaded once into torch's hub cache.
    aesthetic_head="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                   "sac%2Blogos%2Bava1-l14-linearMSE.pth",
    hps_version="v2.1",
    imagereward_model="ImageReward-v1.0",
)
STYLE_TEXTS = {"vangogh": "a Van Gogh painting", "sketch": "a pencil sketch", "winter": "a winter scene"}
NEUTRAL_TEXT = "a photo"
def pickscore(text_feats, image_feats, logit_scale):
    """PickScore: logit_scale.exp() · cos(text, image), per row of two normalised (N, D) tensors."""
    return logit_scale.detach().float().cpu().exp() * (text_feats * image_feats).sum(-1)


def clip_score(text_feats, image_feats):
    """CLIP score: max(100 · cos(text, image), 0), per row."""
    return (100 * (text_feats * image_feats).sum(-1)).clamp(min=0)


def style_probability(image_feats, style_feat, neutral_feat, logit_scale):
    """CLIP zero-shot: P(style text | image) = softmax over [style, neutral] of logit_scale.exp() ·
    cos(image, text), the zero-shot classifier of the CLIP paper with two classes."""
    texts = torch.stack([style_feat.reshape(-1), neutral_feat.reshape(-1)])  # (2, D)
    logits = logit_scale.detach().float().cpu().exp() * image_feats @ texts.T
    return logits.softmax(dim=-1)[:, 0]


@torch.no_grad()
def aesthetic_score(head, image_feats):
    """LAION aesthetic score of normalised CLIP image embeddings (N, D) -> (N,)."""
    param = next(head.parameters())
    return head(image_feats.to(param.device, param.dtype)).float().cpu()


def load_reward_models(metrics, args, device):
    """Every model the metrics need, each loaded once: -> {role: model or (model, processor)}.
    Optional packages are checked first, so a missing one fails before any download."""
    for m in metrics:
        if m in rewards.OPTIONAL_PACKAGES:
            rewards.import_optional(m)  # absent or broken: one line, before anything is downloaded
    clips, models = {}, {}

    def clip(name, flag, what, processor=None, processor_flag=None):
        key = (name, processor or name)
        if key not in clips:
            clips[key] = hub.load_clip(name, flag, what, device, processor, processor_flag)
        return clips[key]

    if "pickscore" in metrics:
        models["pickscore"] = clip(args.pickscore_model, "--pickscore_model", "PickScore", args.pickscore_processor,
                                   "--pickscore_processor")
    if "clip" in metrics or "style" in metrics:
        models["clip"] = clip(args.clip_model, "--clip_model", "CLIP")
    if "aesthetic" in metrics:  # CLIP ViT-L/14 by default: the same object as models["clip"]
        models["aesthetic_clip"] = clip(args.aesthetic_clip or args.clip_model, "--aesthetic_clip",
                                        "the aesthetic predictor's CLIP")
        dim = models["aesthetic_clip"][0].config.projection_dim
        models["aesthetic_head"] = rewards.load_aesthetic_head(args.aesthetic_head, dim, device)
    if "hps" in metrics:
        models["hps"] = rewards.load_hps(args.hps_version, args.hps_checkpoint, device)
    if "imagereward" in metrics:
        models["imagereward"] = rewards.load_imagereward(args.imagereward_model, device)
    return models


def score_rewards(models, paths, prompts, metrics, style_text=STYLE_TEXTS["vangogh"], neutral_text=NEUTRAL_TEXT,
                  batch_size=32):
    """Per-image scores {metric: float32 tensor (N,)} for images `paths` made from `prompts`."""
    image_cache, scores = {}, {}
    unique = list(dict.fromkeys(prompts))  # each prompt's text features once, whatever its seeds
    index = {p: i for i, p in enumerate(unique)}
    where = torch.tensor([index[p] for p in prompts])

    def image_feats(role):  # one pass over the images per CLIP model, shared between metrics
        model, proc = models[role]
        if id(model) not in image_cache:
            image_cache[id(model)] = rewards.clip_image_features(model, proc, paths, batch_size, desc=role)
        return image_cache[id(model)]

    def prompt_feats(role):
        model, proc = models[role]
        return rewards.clip_text_features(model, proc, unique, batch_size)[where]

    if "pickscore" in metrics:
        scores["pickscore"] = pickscore(prompt_feats("pickscore"), image_feats("pickscore"),
                                        models["pickscore"][0].logit_scale)
    if "clip" in metrics or "style" in metrics:
        scores["clip"] = clip_score(prompt_feats("clip"), image_feats("clip"))
    if "style" in metrics:
        model, proc = models["clip"]
        style, neutral = rewards.clip_text_features(model, proc, [style_text, neutral_text])
        scores["style"] = style_probability(image_feats("clip"), style, neutral, model.logit_scale)
    if "aesthetic" in metrics:
        scores["aesthetic"] = aesthetic_score(models["aesthetic_head"], image_feats("aesthetic_clip"))
    if "hps" in metrics:
        scores["hps"] = rewards.hps_scores(models["hps"], paths, prompts, batch_size)
    if "imagereward" in metrics:
        scores["imagereward"] = rewards.imagereward_scores(models["imagereward"], paths, prompts, batch_size)
    return {m: scores[m] for m in metrics}


# ----------------------------------------------------------------------------------------------
# 2. Tables. Toy metrics: per model, mean ± std over seeds of each seed's mean over its images.
#    Reward metrics: per folder, mean ± std over images, and win rates over (prompt, seed) pairs.


def validation_scores(args, images, prompts, resolution, folder, device):
    """train.py --validation_metric: the mean scores of validation images (float (N,3,R,R) in [-1, 1])
    -> {"val_<metric>": mean}: toy, the toy scorer's style and content rates; else reward models,
    scored from PNGs saved in `folder`, as a sample folder is scored. Scorers load once per process
    and configuration."""
    metrics, key = args.validation_metric.split(","), (args.validation_metric, args.validation_reward_flags,
                                                       args.style, resolution, str(device))
    if getattr(validation_scores, "key", None) != key:
        if metrics == ["toy"]:
            with torch.enable_grad():  # (training the scorer needs autograd; validation runs without)
                validation_scores.scorer = toy_scorer.load_toy_scorer(args.style, resolution)[0]
        else:
            flags = parse_args(["--images", "-", *shlex.split(args.validation_reward_flags)])
            validation_scores.scorer = load_reward_models(metrics, flags, device)
        validation_scores.key = key
    if metrics == ["toy"]:
        toy = toy_scorer.score_toy(validation_scores.scorer, images, prompts)
        return {"val_toy_style": toy["style"].mean().item(), "val_toy_content": toy["content"].mean().item()}
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:03d}.png") for i in range(len(prompts))]
    for image, path in zip(tensor_to_uint8(images), paths):
        Image.fromarray(image).save(path)
    scores = score_rewards(validation_scores.scorer, paths, prompts, metrics, batch_size=args.batch_size)
    return {f"val_{k}": v.float().mean().item() for k, v in scores.items()}


def summarize(values_per_seed):
    """-> (mean, sample std with ddof=1); the spread between seeds, so 0.0 for a single seed."""
    v = np.asarray(values_per_seed, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown_table(rows, columns):
    def cell(v):
        if isinstance(v, tuple):
            return f"{v[0]:.3f} ± {v[1]:.3f}"
        return f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # (a label's | would end the cell)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_samples(folder, resolution):
    """A sample.py output folder -> (images (N,3,R,R) in [-1,1], prompts, seeds)."""
    images, prompts, seeds = [], [], []
    for rec in files.read_index(folder):
        path = rec["path"]
        im = files.open_rgb(path)
        if im.size != (resolution, resolution):
            if min(im.size) < resolution:
                raise SystemExit(f"error: {path} is {im.size[0]}x{im.size[1]}, smaller than the "
                                 f"scorer's {resolution}px; pass --resolution")
            im = im.resize((resolution, resolution), Image.BOX)  # box = the renders' own filter
        images.append(image_to_tensor(im))
        prompts.append(rec["prompt"])
        seeds.append(rec["seed"])
    return torch.stack(images), prompts, seeds


def evaluate_folder(folder, label, scorer, metrics):
    """Toy metrics (TOY_METRICS names, e.g. toy_style = score_toy's "style") of one folder."""
    images, prompts, seeds = load_samples(folder, scorer.resolution)
    try:
        scores = toy_scorer.score_toy(scorer, images, prompts)
    except ValueError as e:
        raise SystemExit(f"error: {folder}: {e}")
    run = {"label": label, "dir": folder, "n_images": len(prompts), "metrics": {}}
    for m in metrics:
        per_seed = {str(s): scores[m.removeprefix("toy_")][[i for i, t in enumerate(seeds) if t == s]].mean().item()
                    for s in sorted(set(seeds))}
        mean, std = summarize(list(per_seed.values()))
        run["metrics"][m] = {"mean": mean, "std": std, "per_seed": per_seed}
    return run


def pair_indices(keys_a, keys_b):
    """Match images of two folders by key ((prompt, seed): the same noise and prompt, so the same
    starting point for both models) -> (indices into A, indices into B), in A's order."""
    where_b = {k: i for i, k in enumerate(keys_b)}
    pairs = [(i, where_b[k]) for i, k in enumerate(keys_a) if k in where_b]
    return [i for i, _ in pairs], [j for _, j in pairs]


def win_outcomes(a, b):
    """Per pair: 1 if a > b, 0.5 for a tie, 0 if a < b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a > b) + 0.5 * (a == b)


def win_rate(a, b):
    """Share of pairs where A scores higher than B, ties counting half."""
    return float(win_outcomes(a, b).mean())


def bootstrap_interval(a, b, n=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of win_rate(a, b): resample the pairs with replacement n
    times (numpy, a fixed seed: the same inputs give the same interval) and take the
    (1-level)/2 and (1+level)/2 quantiles of the resampled win rates."""
    outcomes = win_outcomes(a, b)
    rng, rates = np.random.default_rng(seed), []
    per_draw = max(1, 10_000_000 // len(outcomes))  # bound memory at ~80 MB of indices
    for start in range(0, n, per_draw):
        idx = rng.integers(0, len(outcomes), size=(min(per_draw, n - start), len(outcomes)))
        rates.append(outcomes[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(rates), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def compare_runs(run, base, metrics, n_bootstrap=1000, seed=0):
    """Win rates of `run` over `base` on the (prompt, seed) pairs they share -> ({metric:
    {win_rate, ci95, pairs}}, {label: images without a match}). Unmatched images are left out
    of the win rates (their means still count) and reported with a one-line warning."""
    ia, ib = pair_indices([tuple(k) for k in run["keys"]], [tuple(k) for k in base["keys"]])
    unmatched = {run["label"]: run["n_images"] - len(ia), base["label"]: base["n_images"] - len(ib)}
    if not ia:
        raise SystemExit(f"error: no (prompt, seed) of {run['dir']} is in {base['dir']}: nothing to compare")
    if any(unmatched.values()):
        print(f"warning: {unmatched[run['label']]} images of {run['label']} and {unmatched[base['label']]} of "
              f"{base['label']} have no (prompt, seed) match; left out of the win rates", file=sys.stderr)
    wins = {}
    for m in metrics:
        a, b = np.asarray(run["scores"][m])[ia], np.asarray(base["scores"][m])[ib]
        wins[m] = {"win_rate": win_rate(a, b), "ci95": list(bootstrap_interval(a, b, n_bootstrap, seed)),
                   "pairs": len(ia)}
    return wins, unmatched


def reward_table(runs, metrics, win_rates=None, baseline=None):
    """Rows: metrics; columns: each folder's mean ± std over images, then per compared folder the
    win rate over the baseline with its bootstrap interval."""
    columns = ["metric"] + [f"{r['label']} (mean ± std)" for r in runs]
    win_cols = [(label, f"win rate {label} > {baseline} [95% CI]") for label in (win_rates or {})]
    columns += [c for _, c in win_cols]
    rows = []
    for m in metrics:
        row = {"metric": m, **{f"{r['label']} (mean ± std)": (r["metrics"][m]["mean"], r["metrics"][m]["std"])
                               for r in runs}}
        for label, col in win_cols:
            w = win_rates[label][m]
            row[col] = f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"
        rows.append(row)
    return markdown_table(rows, columns)



# ----------------------------------------------------------------------------------------------
# 3. Command line

TOY_METRICS = ("toy_style", "toy_content", "toy_shape_ok", "toy_colour_ok", "toy_background_ok")


def folder_labels(args):
    """Row/column names: --labels (one per --images folder, optionally one more for --baseline),
    else the folder names, made unique with their paths when two folders share a name."""
    folders = args.images + ([args.baseline] if args.baseline else [])
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) == len(args.images) and args.baseline:
            labels.append(os.path.basename(os.path.normpath(args.baseline)))
        if len(labels) != len(folders):
            raise SystemExit(f"error: {len(labels)} --labels for {len(folders)} folders (--images, then --baseline)")
    else:
        labels = [os.path.basename(os.path.normpath(d)) for d in folders]
        if len(set(labels)) < len(labels):
            labels = [os.path.normpath(d) for d in folders]
    if len(set(labels)) < len(labels) or not all(label.strip() for label in labels):
        raise SystemExit(f"error: labels must differ and be non-empty, got {','.join(labels)!r}")
    return folders, labels


def evaluate_toy(args, metrics):
    labels = folder_labels(args)[1]
    for d in args.images:  # fail on a bad folder before spending time on the scorer
        files.read_index(d)
    scorer, acc = toy_scorer.load_toy_scorer(args.style, args.resolution, args.scorer_cache, args.scorer_seed)
    runs = [evaluate_folder(d, lab, scorer, metrics) for d, lab in zip(args.images, labels)]
    rows = [{"model": r["label"], "images": r["n_images"],
             **{m: (r["metrics"][m]["mean"], r["metrics"][m]["std"]) for m in metrics}} for r in runs]
    print(markdown_table(rows, ["model", "images", *metrics]), end="")
    files.write_atomic(args.out or "results.json",
                       json.dumps({"style": args.style, "scorer_accuracy": acc, "runs": runs}, indent=1))
    return runs


def evaluate_rewards(args, metrics):
    """--images (and --baseline) scored by reward models: table on stdout, results.json, bar chart."""
    folders, labels = folder_labels(args)
    records = [files.read_index(d) for d in folders]  # bad folders fail before any model loads
    device = torch.device(parallel.pick_device(args.device))
    style_text = args.style_text or STYLE_TEXTS[args.style_name]
    models = load_reward_models(metrics, args, device)
    runs = []
    for d, label, recs in zip(folders, labels, records):
        print(f"scoring {len(recs)} images in {d} ({label})", file=sys.stderr)
        scores = score_rewards(models, [r["path"] for r in recs], [r["prompt"] for r in recs], metrics,
                               style_text, args.neutral_text, args.batch_size)
        runs.append({"label": label, "dir": d, "n_images": len(recs),
                     "keys": [[r["prompt"], r["seed"]] for r in recs],
                     "metrics": {m: dict(zip(("mean", "std"), summarize(scores[m].tolist()))) for m in metrics},
                     "scores": {m: scores[m].tolist() for m in metrics}})
    win_rates, unmatched = {}, {}
    for run in runs[:-1] if args.baseline else []:
        win_rates[run["label"]], unmatched[run["label"]] = compare_runs(run, runs[-1], metrics, args.bootstrap,
                                                                        args.bootstrap_seed)
    print(f"mean ± std over images (std with ddof=1); win rate: share of (prompt, seed) pairs where the first "
          f"scores higher, ties count half; 95% CI: percentile bootstrap over pairs, {args.bootstrap} resamples")
    print(reward_table(runs, metrics, win_rates, labels[-1] if args.baseline else None), end="")
    out = args.out or "results.json"
    used = {"pickscore": f"{args.pickscore_model} (processor {args.pickscore_processor})", "clip": args.clip_model,
            "style": f"{args.clip_model}: P('{style_text}' vs '{args.neutral_text}')",
            "aesthetic": f"{args.aesthetic_clip or args.clip_model} + {args.aesthetic_head}",
            "hps": f"HPSv2 {args.hps_version} {args.hps_checkpoint or 'xswu/HPSv2'}",
            "imagereward": args.imagereward_model}
    files.write_atomic(out, json.dumps({
        "metrics": metrics, "models": {m: used[m] for m in metrics}, "style_text": style_text,
        "neutral_text": args.neutral_text, "baseline": labels[-1] if args.baseline else None,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95},
        "std": "over images, ddof=1", "win_rates": win_rates, "unmatched": unmatched, "runs": runs}, indent=1))
    png = os.path.splitext(out)[0] + ".png"
    try:
        plots.plot_scores(runs, metrics, png, win_rates)
        print(f"wrote {out} and {png}", file=sys.stderr)
    except SystemExit as err:  # matplotlib is optional here: the table and the JSON are the results
        print(f"wrote {out}; no bar chart ({str(err).removeprefix('error: ')})", file=sys.stderr)
    return runs, win_rates


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those helps say what happens instead
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    """evaluate.py's flags (train.py --validation_reward_flags reads its reward-model group)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults)
    p.add_argument("--images", nargs="+",
                   help="sample.py output folders. Only the images each samples.jsonl lists are read, and only "
                        "inside the folder (a path leading out of it is refused); other files there are ignored; "
                        "a listed file that is not a readable image is an error naming it (nothing is skipped)")
    p.add_argument("--baseline", default=None,
                   help="reward metrics: a folder (e.g. the base model's) to pair with each --images folder by "
                        "(prompt, seed) for win rates")
    p.add_argument("--labels", default=None, help="comma-separated names, one per --images folder (then one for "
                                                  "--baseline, optional); default: folder names")
    p.add_argument("--metrics", default="toy_style,toy_content",
                   help=f"comma-separated. Toy set: {','.join(TOY_METRICS)}. Real images: {','.join(REWARD_METRICS)} "
                        "(style also reports clip: content kept). The two kinds go in separate runs")
    p.add_argument("--out", default=None, help="scoring: the JSON file, results.json by default (reward metrics also "
                                               "write a bar chart next to it, .json -> .png); --curves: curves.png")
    g = p.add_argument_group("reward models (real images)")
    g.add_argument("--pickscore_model", default=REWARD_DEFAULTS["pickscore_model"], help="hub id or local folder")
    g.add_argument("--pickscore_processor", default=REWARD_DEFAULTS["pickscore_processor"],
                   help="hub id or local folder")
    g.add_argument("--clip_model", default=REWARD_DEFAULTS["clip_model"],
                   help="CLIP for clip and style (and aesthetic, by default): hub id or local folder")
    g.add_argument("--aesthetic_clip", default=None, help="CLIP under the aesthetic head (default: --clip_model)")
    g.add_argument("--aesthetic_head", default=REWARD_DEFAULTS["aesthetic_head"],
                   help="the LAION head: .pth (read with weights_only=True) or .safetensors file, or URL")
    g.add_argument("--hps_version", default=REWARD_DEFAULTS["hps_version"], choices=list(rewards.HPS_CHECKPOINTS))
    g.add_argument("--hps_checkpoint", default=None,
                   help="local HPS_v2*_compressed.pt (read with weights_only=True) or .safetensors copy "
                        "(default: the --hps_version file of the hub repo xswu/HPSv2)")
    g.add_argument("--imagereward_model", default=REWARD_DEFAULTS["imagereward_model"],
                   help="ImageReward name or local ImageReward.pt (with HF_HUB_OFFLINE: a local file, "
                        "med_config.json beside it)")
    g.add_argument("--style_name", default="vangogh", choices=list(STYLE_TEXTS),
                   help="style metric: " + ", ".join(f"{k} = '{v}'" for k, v in STYLE_TEXTS.items()))
    g.add_argument("--style_text", default=None, help="style metric: a description instead of --style_name's")
    g.add_argument("--neutral_text", default=NEUTRAL_TEXT, help="style metric: the description it competes with")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the win rates' 95%% CI")
    g.add_argument("--bootstrap_seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=32, help="images per model call")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    t = p.add_argument_group("toy scorer (procedural toy set)")
    t.add_argument("--style", default="winter", choices=list(STYLES), help="the toy style the scorer detects")
    t.add_argument("--resolution", type=int, default=16, help="toy scorer input size")
    t.add_argument("--scorer_cache", default=None, help="used where no shipped scorer (results/toy-study/scorer) fits; default: "
                   ".cache/toy_scorer_{style}_{resolution}.safetensors in the repository")
    t.add_argument("--scorer_seed", type=int, default=0)
    c = p.add_argument_group("training curves")
    c.add_argument("--curves", nargs="+", metavar="LABEL=RUN_DIR", help="plot train.py metrics instead")
    c.add_argument("--style_points", default=None, help="--curves: JSON {label: [[step, style], ...]}")
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def check_flags(p, args):
    """Before anything loads or trains: numbers in their ranges, the files to read readable, the
    file to write writable. One line each (argparse's exit 2)."""
    for name, low, high in (("bootstrap", 1, 10 ** 6), ("batch_size", 1, 2 ** 31 - 1), ("bootstrap_seed", 0, 2 ** 32 - 1),
                            ("scorer_seed", 0, 2 ** 32 - 1), ("resolution", 8, 512)):
        if not low <= getattr(args, name) <= high:
            p.error(f"--{name} must be from {low} to {high}, not {getattr(args, name)}")
    problem = (args.out is not None and files.file_to_write_problem(args.out, "--out")) or \
        (args.scorer_cache is not None and files.file_to_write_problem(args.scorer_cache, "--scorer_cache")) or \
        (args.style_points is not None and files.text_file_problem(args.style_points, "--style_points", always=True)) or \
        hub.pickled_flags_problem(args, ("--pickscore_model", "--clip_model", "--aesthetic_clip"))  # (never unpickled)
    if problem:
        p.error(problem.removeprefix("error: "))


def reward_flags_problem(metrics, flags):
    """train.py --validation_metric METRICS --validation_reward_flags FLAGS: what is wrong, in one
    line, or None (the reward models load at the first validation)."""
    unknown = [m for m in metrics.split(",") if m not in REWARD_METRICS]
    if unknown:
        return f"--validation_metric: unknown {','.join(unknown)}; choose toy or a comma list of {','.join(REWARD_METRICS)}"
    try:
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # (its usage text: ours says it in one line)
            parse_args(["--images", "-", *shlex.split(flags)])
    except (SystemExit, ValueError):
        return f"--validation_reward_flags {flags!r}: not evaluate.py reward-model flags"


def read_style_points(path):
    """--style_points: JSON {label: [[step, style], ...]}."""
    try:
        points = json.loads(files.read_utf8(path))
        if isinstance(points, dict) and all(isinstance(v, list) and all(
                isinstance(x, list) and len(x) == 2 and all(plots.finite_number(n) for n in x) for x in v)
                for v in points.values()):
            return points
    except ValueError:
        pass
    raise SystemExit(f"error: --style_points {path}: expected JSON {{label: [[step, style], ...]}}")


def main(argv=None):
    args = parse_args(argv)
    problem = files.results_problem(args.out or ("curves.png" if args.curves else "results.json"), bool(args.curves),
                                    any(m.strip() in REWARD_METRICS for m in args.metrics.split(",")))
    if problem:  # (before anything is read: a user's file is never replaced, a figure's format is known)
        raise SystemExit(problem)
    if args.curves:
        runs = dict(c.split("=", 1) for c in args.curves if "=" in c and c.split("=")[0].strip())
        if len(runs) != len(args.curves):
            raise SystemExit("error: --curves takes LABEL=RUN_DIR pairs, each with a label of its own")
        points = read_style_points(args.style_points) if args.style_points else None
        if points and set(points) - set(runs):  # (a label of no run was drawn nowhere, without a word)
            raise SystemExit(f"error: --style_points names {sorted(set(points) - set(runs))}, no --curves label")
        plots.plot_curves(runs, args.out or "curves.png", points)
        return print(f"wrote {args.out or 'curves.png'}")
    if not args.images:
        raise SystemExit("error: give --images DIR [DIR ...] or --curves LABEL=RUN_DIR [...]")
    metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in TOY_METRICS + REWARD_METRICS]
    if unknown or not metrics:
        hint = " (the toy scorer's are now toy_style, toy_content)" if {"content"} & set(unknown) else ""
        raise SystemExit(f"error: unknown --metrics {','.join(unknown) or args.metrics!r}{hint}; toy set: "
                         f"{','.join(TOY_METRICS)}; real images: {','.join(REWARD_METRICS)}")
    toy_metrics = [m for m in metrics if m in TOY_METRICS]
    if toy_metrics and len(toy_metrics) < len(metrics):
        raise SystemExit("error: toy metrics (toy_*) and reward-model metrics go in separate runs")
    if toy_metrics:
        if args.baseline:
            raise SystemExit("error: --baseline (win rates) is for reward-model metrics; list toy folders in --images")
        return evaluate_toy(args, metrics)
    if "style" in metrics and "clip" not in metrics:
        metrics.append("clip")  # style without content would reward forgetting the prompt
    return evaluate_rewards(args, metrics)


if __name__ == "__main__":
    main()
