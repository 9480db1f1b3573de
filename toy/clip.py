"""
toy-clip: plumbing.tiny.tiny_clip (the architecture of load_embedder("tiny")) trained contrastively on
the toy world, so that E5's f(c, x) and E6's weights ω carry information on toy data (the random
tiny CLIP maps every toy sample to nearly the same point: ω is uniform whatever τ).

Training: CLIP's symmetric InfoNCE over (caption, render) pairs. Each step holds every training
prompt (toy_prompts("train"), 60) once, so no caption repeats within a batch; each render is
plain, winter or sketch (plumbing.images.apply_style) with the caption unchanged, so style is image-only
information. Seeded and deterministic (one CPU thread; the data stream is numpy's, keyed by
(seed, step)). Where the weights of a recipe are read from (shipped, or a cache folder named by a
hash of the recipe) is plumbing/toy_clip.py's; load() here trains into that folder when neither
holds them. `python -m toy.clip [--out results/toy_clip.txt]` trains (or loads) and reports
held-out text->image retrieval, a linear style probe on the image features, and E6's weight
entropy on toy pairs with the random vs the trained CLIP.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import loss as L
import model as M
from plumbing import speed, tiny, toy_clip
from plumbing.images import STYLES, apply_style, clip_output, clip_pixels, image_to_tensor, render_toy, toy_prompts
from plumbing.toy_clip import RECIPE, recipe_key, source

# Independent numpy streams: training (seed, 0, step); evaluation (seed, 1|2|3, ...).
TRAIN_STREAM, RETRIEVAL_STREAM, PROBE_STREAM = 0, 1, 2


def renders(prompts, resolution, rng, style=None, styles=(), style_fraction=0.0):
    """One render per prompt -> ((N,3,R,R) in [-1, 1], style labels: 0 plain, k = styles[k-1]).
    style: force every render to that style ("plain" or None: as drawn from style_fraction)."""
    out, labels = [], []
    for p in prompts:
        img = render_toy(p, resolution, rng)
        if style is None:
            k = 0 if not styles or rng.random() >= style_fraction else 1 + int(rng.integers(len(styles)))
        else:
            k = 0 if style == "plain" else 1 + list(styles or STYLES).index(style)
        if k:
            img = apply_style(img, (styles or STYLES)[k - 1], rng)
        out.append(image_to_tensor(img))
        labels.append(k)
    return torch.stack(out), torch.tensor(labels)


def _tokens(tokenizer, prompts):
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train(recipe=None, log_every=100):
    """A fresh tiny CLIP trained by `recipe` -> (model, tokenizer, seconds, final loss)."""
    recipe = recipe or RECIPE
    clip, tok = tiny.tiny_clip()
    prompts = toy_prompts("train")
    ids = _tokens(tok, prompts)
    labels = torch.arange(len(prompts))
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe["lr"])
    steps, warmup = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 0
        opt, lambda k: min(1.0, (k + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    clip.train()
    t0, loss = time.time(), None
    with speed.one_thread():
        for step in range(steps):
            rng = np.random.default_rng([recipe["seed"], TRAIN_STREAM, step])
            images, _ = renders(prompts, recipe["resolution"], rng, styles=recipe["styles"],
                                style_fraction=recipe["style_fraction"])
            text = F.normalize(clip_output(clip.get_text_features(input_ids=ids)), dim=-1)
            image = F.normalize(clip_output(clip.get_image_features(pixel_values=clip_pixels(clip, images))), dim=-1)
            logits = clip.logit_scale.exp() * text @ image.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
            if log_every and (step + 1) % log_every == 0:
                print(f"toy-clip step {step + 1}/{steps} loss {loss.item():.3f} "
                      f"scale {clip.logit_scale.exp().item():.1f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    return clip.eval().requires_grad_(False), tok, time.time() - t0, loss.item()


def load(recipe=None, root=None, verbose=True, shipped=toy_clip.SHIPPED):
    """The trained toy CLIP for `recipe` (default RECIPE): plumbing.toy_clip's (shipped or cached),
    else trained now and cached in its folder (written atomically: concurrent processes never read
    a partial file)."""
    recipe = recipe or RECIPE
    found = toy_clip.load(recipe, root, shipped)
    if found is not None:
        return found
    folder = toy_clip.source(recipe, root, shipped)
    weights, meta_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "recipe.json")
    clip, tok, seconds, final = train(recipe, log_every=100 if verbose else 0)
    os.makedirs(folder, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights + suffix)
    with open(meta_path + suffix, "w") as f:
        json.dump({"recipe": recipe, "train_seconds": round(seconds, 2), "final_loss": final}, f, indent=1)
    os.replace(weights + suffix, weights)
    os.replace(meta_path + suffix, meta_path)
    if verbose:
        print(f"toy-clip: trained {recipe['steps']} steps in {seconds:.1f}s -> {weights}", file=sys.stderr)
    return clip, tok


# ----------------------------------------------------------------------------------------------
# Measurements
@torch.no_grad()
def retrieval_accuracy(clip, tok, prompts, rounds=8, style="plain", seed=0, resolution=16):
    """Text->image top-1: in each round every prompt gets one fresh render; each caption must
    pick its own render among the len(prompts) renders. Chance: 1/len(prompts)."""
    hits = []
    with speed.one_thread():
        for r in range(rounds):
            rng = np.random.default_rng([seed, RETRIEVAL_STREAM, r])
            images, _ = renders(prompts, resolution, rng, style=style)
            text, image = M.clip_features(clip, tok, prompts, images)
            hits.append((text @ image.T).argmax(dim=1) == torch.arange(len(prompts)))
    return torch.cat(hits).float().mean().item()


def logistic_probe(x_train, y_train, x_test, y_test, steps=300, weight_decay=1e-3):
    """Held-out accuracy of a logistic-regression probe (binary y), full-batch L-BFGS."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train.float()) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ w + b) > 0
    return (pred == y_test.bool()).float(), (w.detach(), b.detach())


@torch.no_grad()
def _style_set(clip, tok, prompts, rounds, rng, resolution):
    # Every prompt plain, winter and sketch in each round (same geometry for the three versions)
    feats, labels = [], []
    for _ in range(rounds):
        state = rng.bit_generator.state
        for style in ("plain", *STYLES):
            rng.bit_generator.state = state  # the same shapes; the styles' own noise differs
            images, k = renders(prompts, resolution, rng, style=style)
            feats.append(M.clip_features(clip, tok, None, images)[1])
            labels.append(k)
    return torch.cat(feats), torch.cat(labels)


def style_probe(clip, tok, seed=0, resolution=16, rounds=4):
    """Is style linearly visible in the (L2-normalised) image features? A logistic probe, plain
    (label 0) vs styled (winter or sketch, label 1), trained on renders of the training prompts,
    tested on fresh renders of the held-out prompts. -> {"all", "plain", "winter", "sketch"}: accuracy."""
    with speed.one_thread():
        x_tr, k_tr = _style_set(clip, tok, toy_prompts("train"), rounds,
                                np.random.default_rng([seed, PROBE_STREAM, 0]), resolution)
        x_te, k_te = _style_set(clip, tok, toy_prompts("test"), 2 * rounds,
                                np.random.default_rng([seed, PROBE_STREAM, 1]), resolution)
        correct, _ = logistic_probe(x_tr, k_tr > 0, x_te, k_te > 0)
    out = {"all": correct.mean().item()}
    for k, name in enumerate(("plain", *STYLES)):
        out[name] = correct[k_te == k].mean().item()
    return out


@torch.no_grad()
def weight_entropies(clip, tok, taus=(0.1, 0.5, 1.0), batches=50, pairs=8, style="winter", seed=0):
    """Mean loss.weight_entropy of loss.rpo_weights (E5 "mean" embeddings, as train.py) over
    `batches` toy batches of `pairs` pairs (data.ToyPairs' items, in index order), and the mean weight
    on each winner's own loser (the diagonal). -> {tau: (entropy, diagonal)}."""
    prompts_all = toy_prompts("train")
    sums = {tau: [0.0, 0.0] for tau in taus}
    with speed.one_thread():
        for b in range(batches):
            prompts, winners, losers = [], [], []
            for i in range(b * pairs, (b + 1) * pairs):  # data.ToyPairs' item i, drawn the same way
                rng = np.random.default_rng([seed, i])
                prompt = prompts_all[rng.integers(len(prompts_all))]
                plain = render_toy(prompt, 16, rng)
                prompts.append(prompt)
                winners.append(image_to_tensor(apply_style(plain, style, rng)))
                losers.append(image_to_tensor(plain))
            emb = M.clip_embeddings(clip, tok, prompts, torch.stack(winners + losers))
            emb_w, emb_l = emb.chunk(2)
            for tau in taus:
                w = L.rpo_weights(emb_w, emb_l, tau)
                sums[tau][0] += L.weight_entropy(w) / batches
                sums[tau][1] += torch.diagonal(w).mean().item() / batches
    return {tau: tuple(v) for tau, v in sums.items()}


def report(clips, taus=(0.1, 0.5, 1.0)):
    """clips: {name: (model, tokenizer)} -> the lines of the report."""
    test, train_prompts = toy_prompts("test"), toy_prompts("train")
    lines = [f"held-out text->image retrieval, top-1 (12 test prompts, 8 render rounds = 96 queries, "
             f"chance {1 / len(test):.3f}; training prompts: 60-way, chance {1 / len(train_prompts):.3f})",
             f"  {'CLIP':<10} {'plain':>7} {'winter':>7} {'sketch':>7} {'train60':>8}"]
    for name, (clip, tok) in clips.items():
        acc = [retrieval_accuracy(clip, tok, test, style=s) for s in ("plain", *STYLES)]
        acc.append(retrieval_accuracy(clip, tok, train_prompts, rounds=2))
        lines.append(f"  {name:<10} " + " ".join(f"{a:>7.3f}" for a in acc[:3]) + f" {acc[3]:>8.3f}")
    lines += ["", "style probe: logistic regression on L2-normalised image features, plain vs styled "
              "(winter|sketch), trained on train-prompt renders (720), tested on held-out-prompt renders (288)",
              f"  {'CLIP':<10} {'all':>7} {'plain':>7} {'winter':>7} {'sketch':>7}"]
    for name, (clip, tok) in clips.items():
        p = style_probe(clip, tok)
        lines.append(f"  {name:<10} " + " ".join(f"{p[k]:>7.3f}" for k in ("all", "plain", *STYLES)))
    lines += ["", f"E6 weights on data.ToyPairs (50 batches x 8 pairs, seed 0, train split): mean "
              f"weight_entropy in nats (uniform = ln 8 = {math.log(8):.3f}, DPO = 0) / mean diagonal weight"]
    for style in STYLES:
        lines.append(f"  style {style}:")
        lines.append(f"  {'CLIP':<10} " + " ".join(f"{'tau=' + str(t):>16}" for t in taus))
        for name, (clip, tok) in clips.items():
            ent = weight_entropies(clip, tok, taus, style=style)
            lines.append(f"  {name:<10} " + " ".join(f"{ent[t][0]:>8.3f} / {ent[t][1]:.3f}" for t in taus))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="Train (or load) the toy CLIP and report what it knows.")
    p.add_argument("--out", default=None, help="also write the report to this file (results/toy_clip.txt)")
    args = p.parse_args(argv)
    t0 = time.time()
    trained = load()
    with open(os.path.join(source(), "recipe.json")) as f:
        meta = json.load(f)
    lines = [f"toy-clip recipe {json.dumps(RECIPE, sort_keys=True)} (key {recipe_key(RECIPE)}); "
             f"training took {meta['train_seconds']:.1f}s on 1 CPU thread (final loss {meta['final_loss']:.3f}); "
             f"load/train here {time.time() - t0:.1f}s", ""]
    lines += report({"tiny": M.load_embedder("tiny"), "toy-clip": trained})
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"$ OMP_NUM_THREADS=1 python -m toy.clip --out {args.out}\n\n{text}\n")


if __name__ == "__main__":
    main()
