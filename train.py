"""
Diffusion-RPO training (and its DPO and SFT baselines) in one plain PyTorch loop.

    python train.py                                  # RPO on the tiny preset and toy set, CPU (timed in the README)
    python train.py --model sd15 --pretrained /models/sd15 --data pairs.jsonl --gradient_checkpointing \
                    --batch_size 8 --grad_accum 32
    python train.py --lora_rank 8                    # LoRA: only adapters train; ε_ref = adapters off
    torchrun --standalone --nproc_per_node 8 train.py --model sdxl ... [--fsdp] [--global_contrast]

Reads top to bottom: the method (micro_batch_loss, model_inputs: one micro-batch from pairs to loss,
E1..E9 of docs/method.md); the flags; the set-up pieces; main, whose loop calls micro_batch_loss once
per micro-batch. Randomness comes from generators seeded by (seed, step, micro-batch) and (seed,
epoch, index), so a resumed run replays an uninterrupted one exactly. Collectives are
plumbing/distributed.py's (docs/multi-gpu.md); checkpoints plumbing/checkpoint.py's; the out_dir's
lock, Ctrl-C and a full disk plumbing/run_dir.py's; metrics.jsonl and the card plumbing/report.py's;
validation (validate) sample.py's sampler and evaluate.py's scorers.
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time

import torch

import data
import evaluate
import loss as L
import model as M
import sample
from plumbing import checkpoint as C
from plumbing import distributed as D
from plumbing import checks, diffusers_flags, parallel, pickapic, run_dir, speed
from plumbing import report as R
from plumbing.images import STYLES, tensor_to_uint8


# ---------------------------------------------------------------------------------------
# The method, applied to one micro-batch: from a batch of preference pairs to the loss, in the
# order a step computes it, E8, E1, E2/E3, E5, E6, E4/E7, E9 (DPO ends at E2/E3; RPO goes on to E5,
# E6, E4/E7; SFT from E1 to E9). The equations are loss.py's pure functions; these two functions run
# the networks around them through model.py and plumbing/distributed.py (Share: this process's
# rows): one pair crosses those four files (tests/test_prose.py traces it). The loop below and
# bench/speed.py both call micro_batch_loss, so what is benchmarked is what is trained.
# One step, one GPU: B pairs in, one scalar out (shapes for the tiny preset: latents 3×16×16).
#   batch    B prompts c_i, winners x^w_i and losers x^l_i (B,3,H,W)          data.collate_pairs
#   latents  z = s·VAE.encode(x) for [winners; losers]: (2B,C,h,w), rows 0..B-1 the winners and
#            B..2B-1 the losers; text conditioning c repeated the same way      model_inputs
#   t, ε     E8: one t (RPO; one per pair for DPO) and one ε_i (B,C,h,w) per pair, .repeat(2) so
#            that winner i and loser i share them: t (2B,), ε (2B,C,h,w)
#   z_t      the forward process sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε                   (2B,C,h,w)
#   err      E1: e_θ = mean over C·h·w of (ε − ε_θ(z_t,t,c))², policy, with grad   (2B,)
#   ref_err  E1: e_ref likewise with the frozen reference, no grad               (2B,)
#   err_w, err_l = err.chunk(2)   the halves of [winners; losers]                  (B,), (B,)
#   DPO      E2-E3: Δ_ii = (e_θ(w_i) − e_ref(w_i)) − (e_θ(l_i) − e_ref(l_i)),
#            loss = −mean_i log σ(−(β/2)·Δ_ii)                                  scalar
#   features E5: CLIP text (B,D) and image (2B,D) features -> f(c,x) for [winners; losers] (2B,D)
#   ω        E6: softmax over losers j of −(1 − cos(f(w_i), f(l_j)))/τ               (B,B)
#   RPO      E4, E7: Δ_ij for every winner i and loser j (B,B); outside: loss = −(1/B)·Σ_ij ω_ij·log σ(−(β/2)·Δ_ij)
# `share` is the identity on one process (keep() returns its input, everyone() too); under
# torchrun it keeps this rank's rows of draws made for the global micro-batch (plumbing/distributed.py).
def micro_batch_loss(m, batch, generator, args, share=None, policy=None, embedder=None, autocast=None):
    """One micro-batch -> (loss, metrics), as loss.py returns them.
    batch    what data.py yields: raw pairs (prompts, winner/loser images), a cache's tensors
             (--data cache:DIR), or already-encoded inputs {"latents", "cond", "features"}.
    args     train.py's flags (loss, timesteps, beta, tau, rpo_weighting, embed, caption_dropout).
    share    this process's rows of the global micro-batch (distributed.Share; default: all of it).
    policy   the module that runs ε_θ: m.unet, or its DDP/FSDP wrapper under torchrun.
    embedder what embed(args, device=...) loads for E5 from raw images: (CLIP, tokenizer)."""
    objective = L.OBJECTIVES[args.loss]  # its function and what it needs (loss.py)
    pairs = objective["pairs"]  # False (SFT): winners alone, no reference
    share = share or D.Share(len(batch["prompt"]))
    autocast = autocast or contextlib.nullcontext()
    # The data as the networks see it (model.py): latents z = s·VAE.encode(x) for [winners;
    # losers], the text conditioning c (a dropped caption: the unconditional input), and E5's
    # CLIP text and image features (none for DPO/SFT).
    latents, cond, features = model_inputs(m, batch, generator, args, share, embedder)
    with torch.no_grad():
        # E8: one t per micro-batch (RPO) or per pair (DPO), and ε; winner i and loser i share
        # both (.repeat(2)), so their errors differ by the images, not by the noise.
        T, sample_t = m.scheduler.config.num_train_timesteps, objective.get("sample_t", L.sample_timesteps)
        t = share.keep(sample_t(share.total, T, args.timesteps, generator)).to(latents.device)
        noise = share.keep(L.sample_noise((share.total, *latents.shape[1:]), generator)).to(latents.device)
        if pairs:
            t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)
        # The forward process q(z_t | z_0): z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε
        noisy = m.scheduler.add_noise(latents, noise, t)
        v_pred = m.scheduler.config.prediction_type == "v_prediction"
        target = m.scheduler.get_velocity(latents, noise, t) if v_pred else noise
    with autocast:
        err = L.denoising_error(M.predict_noise(policy or m.unet, noisy, t, cond), target)  # E1, policy
    settings = L.loss_kwargs(args.loss, vars(args))  # β, ... : the settings its function takes
    if not pairs:
        return objective["fn"](err, **settings)  # E9: plain denoising loss on winners
    # E1 for the frozen reference: m.ref_unet, or for LoRA the same UNet with its adapters off
    # (model.reference_unet). No gradient, and under DDP no communication: it is never wrapped.
    with torch.no_grad(), autocast, M.reference_unet(m) as ref_unet:
        ref_err = L.denoising_error(M.predict_noise(ref_unet, noisy, t, cond), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    if not objective["weights"]:
        return objective["fn"](err_w, err_l, ref_w, ref_l, **settings)  # E2, E3 (DPO)
    # E5: f(c, x) for every winner and loser; E6: ω_ij = softmax over losers j of -(1 - cos)/τ.
    # With --global_contrast, everyone() gathers every rank's rows first, so that the matrix
    # spans the global micro-batch (4 scalars and 2 embeddings a pair cross ranks, never images).
    emb = embed(args, halves=features, rows=len(latents))
    emb_w, emb_l = share.everyone(*emb.chunk(2))
    weights = L.rpo_weights(emb_w, emb_l, args.tau)
    err_w, err_l, ref_w, ref_l = share.everyone(err_w, err_l, ref_w, ref_l)
    return objective["fn"](err_w, err_l, ref_w, ref_l, weights, **settings)  # E4, E7 (RPO)


@torch.no_grad()
def model_inputs(m, batch, generator, args, share, embedder=None):
    """batch -> (latents, cond, (CLIP text features, CLIP image features)) for micro_batch_loss.
    Random draws (caption dropout, the VAE posterior's sample z = μ + σ·n) are made for the
    global micro-batch and this process's rows kept, in this order, so every rank computes what
    one process computes for the concatenated batch."""
    if "latents" in batch:  # already encoded (bench/speed.py, tests)
        return batch["latents"], batch["cond"], batch.get("features")
    pairs = L.OBJECTIVES[args.loss]["pairs"]
    k = 2 if pairs else 1  # images per pair in the model's batch: [winners; losers], or winners alone
    rows = k * share.total  # the global batch's images
    drop = torch.zeros(share.n, dtype=torch.bool)
    if args.caption_dropout > 0:  # classifier-free guidance needs ε_θ(z_t, t, "") too
        drop = share.keep(torch.rand(share.total, generator=generator)) < args.caption_dropout
    sizes = torch.cat([batch["original_size_w"], batch["original_size_l"]]) if pairs else batch["original_size_w"]
    crops = batch["crop_top_left"].repeat(k, 1)
    if "cache_latent_w" in batch:  # --data cache:DIR: the encoders' outputs, stored
        return M.cached_inputs(m, batch, drop, sizes, crops, generator, share, rows, pairs)
    images = torch.cat([batch["winner"], batch["loser"]]) if pairs else batch["winner"]
    # z = s·(μ + σ·n), n drawn for all `rows` of the global micro-batch, this process's kept
    latents = M.encode_images(m, images, generator, share, rows, pairs)
    # c: dropped captions get the unconditional input that guidance uses at sampling time
    cond = M.encode_prompts(m, batch["prompt"], sizes, crops, repeat=k, drop=drop)
    return latents, cond, embed(args, embedder, batch["prompt"], images) if L.OBJECTIVES[args.loss]["weights"] else None


def embed(args, embedder=None, prompts=None, images=None, halves=None, rows=None, device=None):
    """E5, what f(c, x) is, in this one function, which an idea that embeds otherwise replaces (docs/fork.md):
      embed(args, device=d)                   main: the model it runs, (CLIP, tokenizer) of --embed_model
      embed(args, embedder, prompts, images)  model_inputs: its halves, text (B, D) and image (2B, D) features
      embed(args, halves=h, rows=2B)          micro_batch_loss: f(c, x) of every winner and loser (2B, D)"""
    if device is not None:
        return M.load_embedder(args.embed_model, device)
    if halves is None:  # one CLIP pass, each prompt once: the pair's own, dropped or not (dropout conditions the UNet)
        return M.clip_features(*embedder, None if args.embed == "image" else prompts, None if args.embed == "text" else images)
    return L.combine_features(*halves, args.embed, rows=rows)  # E5: normalize(text + image), or one of them


# ---------------------------------------------------------------------------------------
# Flags
def parser():
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(M.PRESETS), help="preset (model.py)")
    g.add_argument("--pretrained", "--pretrained_model_name_or_path", default=None,
                   help="hub id or local diffusers folder for sd15/sdxl (default: the preset's hub id)")
    g.add_argument("--init", default=None, help="start policy and reference from this saved unet/ folder")
    g.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto: bf16 on a GPU (fastest in bench/speed.py, no grad scaler needed), no on the CPU")
    g.add_argument("--compile", nargs="?", const="regional", default="auto", choices=["auto", "none", "regional", "full"],
                   help="torch.compile the UNets: regional (the flag alone) compiles each block once, at the start; full "
                        "the whole UNet; auto: regional on a GPU, none on the CPU (docs/speed-gpu.md)")
    g.add_argument("--sdpa_backend", default="auto", choices=["auto", *speed.SDPA_BACKENDS],
                   help="attention kernel; auto: cudnn on a GPU (fastest on an H200), PyTorch's choice on the CPU")
    g.add_argument("--gradient_checkpointing", nargs="?", const="all", default="auto", metavar="WHICH",
                   help="recompute activations in backward: all (the flag alone), transformer, transformer:F (that "
                        "fraction of the transformer blocks, widest first), alternate, resnet, hires, none; auto: "
                        "transformer:0.25 for a full fine-tune of sd15/sdxl on a GPU (the fastest that fits SDXL in "
                        "80 GB: docs/speed-gpu.md), none otherwise")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="train a LoRA of this rank (needs peft) instead of the whole UNet; 0: full fine-tune")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale is alpha/rank (default alpha: the rank)")
    g.add_argument("--lora_targets", default=",".join(M.LORA_TARGETS),
                   help="comma list of UNet module-name suffixes that get adapters")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy UNet, its gradients and AdamW state over the ranks "
                        "(FSDP2 fully_shard) instead of replicating them (DDP); full fine-tunes only")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="toy (pairs), toy-base (single images, for --loss sft), a .jsonl manifest, hf:DIR or hf:HUB_ID "
                        "(parquet preference pairs, optionally #SCHEMA: pickapic, open-image-preferences, hpdv2 or "
                        "#prompt=COL,winner=COL,loser=COL; pickapic:DIR|HUB_ID = #pickapic), or cache:DIR (data.py "
                        f"cache). Default: toy for tiny presets, {pickapic.DEFAULT_DATA} for sd15/sdxl")
    g.add_argument("--data_split", default="train", help="hf:/pickapic: the shards' split (file prefix / hub split); toy: prompts")
    g.add_argument("--shuffle_window", type=int, default=4,
                   help="hf:DIR: rows are shuffled across this many row groups at a time (memory: that many + 1)")
    g.add_argument("--shuffle_buffer", type=int, default=1000, help="hf:HUB_ID: the datasets shuffle buffer (rows)")
    g.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    g.add_argument("--style", default="winter", choices=list(STYLES), help="toy set: the preferred style")
    g.add_argument("--style_fraction", type=float, default=1 / 3, help="toy-base: share of styled images")
    g.add_argument("--num_items", type=int, default=8192, help="toy sets: items per epoch")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="share of pairs whose UNet gets the unconditional input guidance uses (SD1.5 '', SDXL zeros)")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop (same for winner and loser)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flip (same for winner and loser)")
    g.add_argument("--num_workers", type=speed.workers_flag, default="auto",
                   help="DataLoader worker processes that decode and crop; auto: a few on a GPU, 0 on the CPU")
    g.add_argument("--embed_model", default=None, help="CLIP for E5 (default: toy-clip, trained on the toy world, for "
                   "tiny presets; 'tiny': a random tiny CLIP; else openai/clip-vit-large-patch14)")
    g = p.add_argument_group("objective (loss.OBJECTIVES, loss.SETTINGS)")
    g.add_argument("--loss", default="rpo", choices=list(L.OBJECTIVES), help="; ".join(
        f"{k}: {o['about']} (reads {', '.join(L.settings_of(k))})" for k, o in L.OBJECTIVES.items()))
    for name, s in L.SETTINGS.items():  # type=bool: a --name/--no-name switch
        kind = dict(action=argparse.BooleanOptionalAction) if s["type"] is bool else dict(type=s["type"], choices=s.get("choices"))
        readers = ", ".join(k for k in L.OBJECTIVES if name in L.settings_of(k))
        g.add_argument(f"--{name}", default=s["default"], help=f"{s['help']} (read by --loss {readers})", **kind)
    g.add_argument("--global_contrast", action="store_true", help="under torchrun, rpo: contrast every winner with "
                   "every loser of the *global* micro-batch (B·W × B·W, E4-E7) instead of each rank's own B × B")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", "--train_batch_size", type=int, default=8,
                   help="pairs per device per micro-batch (RPO contrasts B×B; under torchrun the global "
                        "micro-batch is B × world size)")
    g.add_argument("--grad_accum", "--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", "--learning_rate", type=float, default=2.048e-5,
                   help="per optimizer step (the paper's recipe: 2.048e-5 for 2048 pairs per step, i.e. 1e-8 per pair)")
    g.add_argument("--recipe", default=None, choices=["paper"],
                   help="sd15/sdxl: the paper's recipe as defaults (2048 pairs/step through accumulation over the "
                        "processes, lr 1e-8 per pair, warm-up 500/200, 2000 steps, AdamW/Adafactor); flags given win. Its "
                        "lr is DPO's: RPO (ω outside) needed 3-6x it on the toy (docs/method.md, 'The learning rate')")
    g.add_argument("--scale_lr", action="store_true",
                   help="read --lr as per pair and multiply it by the pairs per step (batch × accumulation × ranks)")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up, then constant (Diffusion-DPO recipe)")
    g.add_argument("--max_steps", "--max_train_steps", type=int, default=None,
                   help="optimizer steps (default 300, or --num_train_epochs over the data)")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adamw_fused", "adafactor", "adamw8bit"],
                   help="auto: fused AdamW on a GPU, AdamW on the CPU. adafactor: what Diffusion-DPO's SDXL "
                        "script uses; adamw8bit needs bitsandbytes")
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_eps", type=float, default=1e-8)
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite losses or gradients in a row")
    g.add_argument("--seed", type=int, default=0)
    output_flags(p)
    diffusers_flags.add_flags(p)  # (their names, each with its meaning there or refused in one line)
    return checks.one_name_each(p, diffusers_flags.SAME_SETTING)  # --lr 1e-5 --learning_rate 1e-3: refused


def output_flags(p):
    """Where a run writes, how it reports, and validation while it trains."""
    g = p.add_argument_group("output")
    g.add_argument("--out_dir", "--output_dir", default="out/rpo-tiny")
    g.add_argument("--save_every", "--checkpointing_steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out_dir that holds a run: its checkpoints, metrics.jsonl, unet/ (lora/), logs, "
                        "validation/, args.json and card are deleted once the data and models have loaded (without it: refused)")
    g.add_argument("--allow_changed_resume", action="store_true",
                   help="--resume even with another --pretrained/--init (the same model moved, say), --resolution, --data "
                        "(its --style, --data_split, ...) or objective (--loss, a setting it reads, --embed_model)")
    g.add_argument("--resume", "--resume_from_checkpoint", nargs="?", const="latest", default=None,
                   help="continue from OUT_DIR's latest checkpoint, or from the checkpoint folder given")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar: a line of figures every --log_every steps")
    g.add_argument("--log_every", type=int, default=10, help="with --no_progress: print figures every N steps (0: never)")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also log scalars and validation grids there (tensorboard: OUT_DIR/LOGGING_DIR)")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard's folder, under --out_dir")
    g.add_argument("--tracker_name", default="rpo-diffusion", help="the W&B project of --report_to wandb")
    g.add_argument("--push_to_hub", action="store_true",
                   help="at the end, upload OUT_DIR's result, model card and args.json to the hub (huggingface_hub)")
    g.add_argument("--hub_model_id", default=None, help="--push_to_hub's repo, owner/name (default: OUT_DIR's name)")
    g = p.add_argument_group("validation: sample fixed prompts and seeds while training")
    g.add_argument("--validation_prompts", default=None,
                   help="as sample.py --prompts: builtin, toy-test, a file, or 'a cat|a dog'. Sampled at the end "
                        "and every --validation_every steps into OUT_DIR/validation/")
    g.add_argument("--validation_every", type=int, default=0, help="steps between validation grids (0: the end only)")
    g.add_argument("--validation_seeds", default="0-3", help="seeds of the validation images (sample.py's syntax)")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="sampler steps (DDIM)")
    g.add_argument("--validation_guidance", type=float, default=None, help="default: 7.5 (SD1.5), 5.0 (SDXL), 5 (toy)")
    g.add_argument("--validation_metric", default="none",
                   help="score the validation images and log the means in metrics.jsonl (curves): toy (the toy "
                        "style/content scorer: val_toy_style, val_toy_content) or a comma list of evaluate.py's reward "
                        "metrics for real images, e.g. pickscore,hps (val_pickscore, val_hps)")
    g.add_argument("--validation_reward_flags", default="",
                   help="evaluate.py's reward-model flags for those metrics, e.g. '--pickscore_model /models/pickscore'")


# The paper's training recipe (Diffusion-DPO's, which it follows): 2048 pairs per optimizer step,
# lr 1e-8 per pair, linear warm-up then constant, 2000 steps, β 5000, grad clip 1. --recipe paper
# fills these in (flags given explicitly still win), accumulating to 2048 pairs over the processes.
RECIPES = {"sd15": dict(batch_size=8, warmup_steps=500, optimizer="adamw", resolution=512),
           "sdxl": dict(batch_size=4, warmup_steps=200, optimizer="adafactor", resolution=1024)}
RECIPE_PAIRS = 2048
RECIPE_LR_PER_PAIR = 1e-8  # 2.048e-5 per step for 2048 pairs


def parse_args(argv=None):
    p = parser()
    first, _ = p.parse_known_args(argv)
    if first.recipe == "paper":  # the recipe's values become defaults: explicit flags override them
        if first.model not in RECIPES:
            p.error(f"--recipe paper is for --model sd15 or sdxl, not {first.model}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        batch = RECIPES[first.model]["batch_size"] if first.batch_size == p.get_default("batch_size") else first.batch_size
        p.set_defaults(**RECIPES[first.model], grad_accum=max(1, RECIPE_PAIRS // (batch * world)), scale_lr=True,
                       lr=RECIPE_LR_PER_PAIR, max_steps=2000, beta=5000.0, max_grad_norm=1.0)
    args = p.parse_args(argv)
    diffusers_flags.resolve(args, diffusers_flags.stop)
    if args.max_steps is None and args.num_train_epochs is None:
        args.max_steps = 300
    args.timesteps = args.timesteps or L.OBJECTIVES[args.loss]["timesteps"]
    if args.data is None:  # a real model gets real preference data that exists (Pick-a-Pic v2 left the hub)
        args.data = "toy" if M.PRESETS[args.model]["pretrained"] is None else pickapic.DEFAULT_DATA
    if args.embed_model is None:
        args.embed_model = M.default_embed_model(args.model, args.pretrained)
    check_flags(p, args)  # every value in its range, every path usable: one line each, exit 2
    return args


def check_flags(p, args):
    """parse_args' checks: the objective's settings in the ranges loss.SETTINGS declares (only those
    --loss reads), --resolution a multiple of the preset's, plumbing/checks.py's (what needs nothing
    of the six), the validation flags (sample.py's seeds and prompts, evaluate.py's reward flags)."""
    for name in L.settings_of(args.loss):  # (any float flag, read or not, is finite: checks.py)
        s, value = L.SETTINGS[name], getattr(args, name)
        if s.get("positive") and not 0 < value < float("inf"):
            p.error(f"--{name} must be a positive finite number, not {value}")
        if "range" in s and not s["range"][0] <= value <= s["range"][1]:
            p.error(f"--{name} must be between {s['range'][0]} and {s['range'][1]}, not {value}")
    multiple = M.PRESETS[args.model]["multiple"]  # (what its VAE and UNet down-sample by)
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % multiple):
        p.error(f"--resolution must be a positive multiple of {multiple} for --model {args.model} (what its VAE and "
                f"UNet down-sample by), not {args.resolution}")
    checks.check_train_flags(p, args)  # the numbers and paths that need nothing of the six
    if args.validation_metric not in ("none", "toy") and (problem := evaluate.reward_flags_problem(
            args.validation_metric, args.validation_reward_flags)):
        p.error(problem)
    if args.validation_prompts is not None:
        try:
            args.validation_seeds = sample.parse_seeds(args.validation_seeds)
        except argparse.ArgumentTypeError as err:
            p.error(f"--validation_seeds: {err}")
        args.validation_prompts = sample.read_prompts(args.validation_prompts)
        checks.validation_grid(p, args, sample.GRID_MAX)  # (one picture, held in memory while it is made)


def learning_rate(args, step):
    """The lr of optimizer step `step` (0-based): linear warm-up from 0, then constant, as
    diffusers' constant_with_warmup schedule (stepped after each optimizer step) gives it."""
    return args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr


# ---------------------------------------------------------------------------------------
# Set-up pieces of main()
def describe(args, m, params, world, dataset):
    """The start-up line: what trains, on what, how many pairs per optimizer step."""
    what = f"{M.unet_size(m.unet) / 1e6:.1f}M-parameter UNet"
    if m.lora:
        what += f", LoRA rank {args.lora_rank}: {sum(p.numel() for p in params) / 1e6:.3f}M trainable"
    on = (f"{world} ranks ({'FSDP' if args.fsdp else 'DDP'}, {torch.distributed.get_backend()}, {m.device.type}), "
          f"{args.batch_size}×{args.grad_accum}×{world}") if world > 1 else f"{m.device}, {args.batch_size}×{args.grad_accum}"
    size = "(streamed)" if hasattr(dataset, "stream") else f"({len(dataset)} items)"
    pairs = args.batch_size * args.grad_accum * world
    read = ", ".join(f"{k} {v}" for k, v in settings_shown(args).items())  # the settings it reads, and only those
    return (f"training {args.loss} ({read}) on {args.model} ({what}) on {on} = {pairs} pairs/step, data {args.data} {size}\n"
            f"lr {args.lr:g} per step = {args.lr / pairs:.3g} per pair (the paper's recipe: {RECIPE_LR_PER_PAIR:g} per "
            f"pair, 2.048e-5 for 2048 pairs/step)")


def settings_shown(args):
    """The settings --loss reads, and only those, with their values as the start line and the card show them."""
    return {k: f"{v:g}" if isinstance(v := getattr(args, k), float) else str(v) for k in L.settings_of(args.loss)}


def clip_gradients(params, optimizer, scaler, max_norm):
    """Unscale (fp16) and clip the accumulated gradients; returns their global norm before clipping."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor


def stop_message(bad_steps, step, cause, out_dir):
    return (f"error: {bad_steps} bad steps in a row at step {step} (last: {cause}); weights before them saved in "
            f"{out_dir}/checkpoint-{step:06d}; try a lower --lr or --beta, and check the data")


def due(every, step):
    return bool(every) and step % every == 0


class Reporter:
    """What a run reports, on rank 0: OUT_DIR/metrics.jsonl (one line per optimizer step), a tqdm
    bar or, with --no_progress, a line every --log_every steps, and the scalars and validation grids
    in TensorBoard or Weights & Biases (--report_to)."""

    def __init__(self, args, step, master):
        self.args, self.master, self.tracker, self.bar = args, master, None, None
        if not master:
            return
        self.metrics = R.open_metrics(args.out_dir, step, args.resume)
        if not args.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True)
        self.tracker = R.open_tracker(args, step)  # --report_to: TensorBoard, W&B or None

    def step(self, record):
        """One optimizer step's figures (a dict with "step")."""
        if not self.master:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if self.args.report_to == "tensorboard":
            for k, v in scalars.items():
                self.tracker.add_scalar(f"train/{k}", v, record["step"])
        elif self.args.report_to == "wandb":
            self.tracker.log({f"train/{k}": v for k, v in scalars.items()}, step=record["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}",
                                 pairs_s=f"{record['pairs_per_s']:.1f}")
        elif self.args.log_every and record["step"] % self.args.log_every == 0:
            keys = ("loss", "implicit_acc", "reward_margin", *L.OBJECTIVES[self.args.loss]["log"], "grad_norm", "lr",
                    "pairs_per_s")  # (the objective's own diagnostics too: RPO's weight_diag, weight_entropy)
            shown = ", ".join(f"{k} {record[k]:.4g}" for k in keys if k in record)
            print(f"step {record['step']}/{self.args.max_steps}: {shown}", flush=True)

    def image(self, step, name, grid):
        """A validation grid (PIL image), already saved under OUT_DIR/validation/."""
        if self.master and self.tracker is not None:
            R.tracker_image(self.args, self.tracker, step, name, grid)

    def close(self):
        if not self.master:
            return
        self.metrics.close()
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            (self.tracker.close if self.args.report_to == "tensorboard" else self.tracker.finish)()


@torch.no_grad()
def validate(args, m, step, reporter, master):
    """Sample the validation prompts × seeds with the current policy (sample.py's sampler, the
    same images sample.py would make from a checkpoint) into OUT_DIR/validation/step-N.png.
    Every rank runs it under FSDP (the sharded UNet's forward is a collective), rank 0 else.
    Returns (the grid's path, scores): with --validation_metric, the mean scores of these images
    (evaluate.validation_scores: the toy scorer's style and content rates, or reward models), for
    metrics.jsonl as curves."""
    if not (master or args.fsdp):
        return None, {}
    guidance = 7.5 if M.PRESETS[args.model]["pretrained"] and not m.xl else 5.0  # (SD1.5's; SDXL's and toy's 5)
    guidance = guidance if args.validation_guidance is None else args.validation_guidance  # (0 too: no guidance)
    training = m.unet.training
    m.unet.eval()
    images = sample.generate(m, args.validation_prompts, args.validation_seeds, args.validation_inference_steps, guidance,
                             batch_size=args.batch_size)
    m.unet.train(training)
    if not master:
        return None, {}
    prompts = [p for p in args.validation_prompts for _ in args.validation_seeds]  # generate's order
    name = os.path.join("validation", f"step-{step:06d}.png")  # (reward models score PNGs saved in step-N/)
    scores = {} if args.validation_metric == "none" else evaluate.validation_scores(
        args, images, prompts, m.resolution, os.path.join(args.out_dir, name[:-len(".png")]), m.device)
    scale = max(1, 128 // m.resolution)  # tiny presets' 16-32 px images, enlarged to be seen
    grid = sample.make_grid(tensor_to_uint8(images), len(args.validation_prompts), len(args.validation_seeds), scale)
    os.makedirs(os.path.join(args.out_dir, "validation"), exist_ok=True)
    grid.save(os.path.join(args.out_dir, name))
    reporter.image(step, "grid", grid)
    return name, scores


def publish(args, final, folder, step, pairs_per_step, grid, argv, log):
    """Rank 0, at the end: OUT_DIR/unet (or the LoRA) from the final checkpoint, the model card
    beside it, and with --push_to_hub the upload (after everything is saved: a failure loses nothing)."""
    C.export(args.out_dir, final, folder)
    objective = f"`--loss {args.loss}`: {L.OBJECTIVES[args.loss]['about']}" + "".join(
        f"; {k} = {v}" for k, v in settings_shown(args).items())  # and the settings it reads
    R.model_card(args, M.PRESETS[args.model], objective, step, pairs_per_step, folder, grid,
                 command=shlex.join(["python", "train.py", *argv]))
    if args.push_to_hub:
        repo, files = R.push_to_hub(args, folder)
        log(f"pushed {len(files)} files to the hub: {repo}")


# ---------------------------------------------------------------------------------------
def main(argv=None):
    """The flags, then the run, holding --out_dir's lock, with Ctrl-C and SIGTERM ending it at the
    end of a step (a checkpoint saved); a full disk while writing ends in one line."""
    argv_ = list(sys.argv[1:] if argv is None else argv)  # (the model card quotes the command)
    args = parse_args(argv)
    with run_dir.guarded_run(args.out_dir) as stop:
        rank, world, device, own_group = parallel.setup(args.device)  # torchrun: one process per device
        master = rank == 0  # logs and writes files; every rank computes
        log = print if master else (lambda *a, **k: None)
        if args.fsdp and not D.active():  # (torchrun with one process runs FSDP's code path: a check on one GPU)
            raise SystemExit("error: --fsdp shards the UNet over processes; launch with torchrun --nproc_per_node N")
        run_dir.lock_out_dir(args.out_dir, master)  # one run writes an out_dir at a time (released when main ends)
        doomed = run_dir.check_out_dir(args, master)  # before anything loads: a fresh run never writes into another run
        torch.manual_seed(args.seed)  # the same on every rank: identical initial LoRA adapters
        pairs_per_step = args.batch_size * args.grad_accum * world
        if args.scale_lr:  # --lr given per pair, the diffusers scripts' convention
            args.lr *= pairs_per_step
        speed.device_defaults(args, device, real=M.PRESETS[args.model]["pretrained"] is not None)
        dataset, resolution = data.from_args(args, world)
        skip_counts = parallel.same_data(dataset, args.data)  # index-level: checked the same on every rank (or resumed)
        new_skips = {}  # skips this rank met while reading (corrupt images; hub: ties, ...)

        m, policy = M.from_args(args, device, dataset, resolution)
        cached = args.data.startswith("cache:")  # (a cache holds E5's features: no CLIP needed)
        embedder = embed(args, device=device) if L.OBJECTIVES[args.loss]["weights"] and not cached else None  # E5's CLIP
        autocast = torch.autocast(device_type=m.device.type, dtype=m.dtype, enabled=args.mixed_precision != "no")

        # Optimizer (DDP's replicas are m.unet's tensors; FSDP's are shards, so AdamW's moments are
        # sharded too), and where to start.
        params = [p for p in m.unet.parameters() if p.requires_grad]  # LoRA: the adapter's A and B only
        optimizer = M.make_optimizer(args.optimizer, params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                                     args.weight_decay)
        scaler = torch.amp.GradScaler(m.device.type, enabled=args.mixed_precision == "fp16")
        step, epoch, items_in_epoch = 0, 0, 0
        run_dir.make_out_dir(args, doomed, master)  # (--overwrite deletes the earlier run now: its inputs loaded)
        if args.resume:
            ckpt, state = C.resume(args, m, optimizer, scaler, master, L.settings_of(args.loss), M.PRESETS[args.model]["resolution"])
            step, epoch, items_in_epoch = state["step"], state["epoch"], state["items_in_epoch"]
            skip_counts = state.get("skip_counts", skip_counts)
        log(describe(args, m, params, world, dataset))
        if note := speed.input_note(args, m.device, dataset):  # on a GPU: whether the input path may hold it back
            log(note)
        if M.PRESETS[args.model]["pretrained"] and args.lr / pairs_per_step > 10 * RECIPE_LR_PER_PAIR:
            log(f"warning: lr per pair {args.lr / pairs_per_step:.3g} is {args.lr / pairs_per_step / RECIPE_LR_PER_PAIR:.0f}× "
                f"the paper's; for its rate pass --scale_lr --lr 1e-8, or more accumulation (--grad_accum)")
        if master:
            R.write_args(args)

        def save(path, keep=None):  # every rank calls it (FSDP gathers, skips are summed); rank 0 writes
            position = dict(step=step, epoch=epoch, items_in_epoch=items_in_epoch)
            C.save(path, args, m, optimizer, scaler, position, all_skips(), master, keep)

        def all_skips():
            return {**skip_counts, **{k: skip_counts.get(k, 0) + n for k, n in D.sum_counts(new_skips).items()}}

        # -----------------------------------------------------------------------------------
        # The loop: grad_accum micro-batches, one optimizer step.
        stream = data.stream_batches(dataset, args.batch_size, args.seed, epoch, items_in_epoch, rank, world,
                                     args.num_workers, device=m.device)  # batch_size pairs each, on every rank
        share = D.Share(args.batch_size, rank, world, global_contrast=args.global_contrast and world > 1)
        reporter = Reporter(args, step, master)
        bad_steps, last_epoch, grid, start = 0, epoch, None, step
        stop.in_loop = True
        while step < args.max_steps:
            # Ctrl-C or SIGTERM (any rank's): the last finished step saved, then exit 130/143
            if not D.all_ranks(stop.signum is None, m.device):
                reporter.close()
                stop.stop_now(run_dir.save_on_stop(args, step, start, save), master)
            t0 = time.time()
            lr = learning_rate(args, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums, finite = {}, True
            for micro in range(args.grad_accum):
                epoch, items_in_epoch, batch = next(stream)  # (the same position on every rank)
                data.count_skips(new_skips, batch["skipped"])  # read past: unreadable images (hub: ties, ...)
                generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1009 + micro)
                # DDP all-reduces gradients in the last micro-batch's backward only (no_sync before);
                # FSDP reduce-scatters every micro-batch (docs/multi-gpu.md).
                accumulate = world > 1 and not args.fsdp and micro < args.grad_accum - 1
                with policy.no_sync() if accumulate else contextlib.nullcontext():
                    loss, metrics = micro_batch_loss(m, batch, generator, args, share, policy, embedder, autocast)
                    finite = D.all_ranks(torch.isfinite(loss).item(), m.device)
                    if finite or world > 1:  # DDP/FSDP: every forward needs its backward (the reducer waits)
                        scaler.scale(loss / args.grad_accum).backward()
                if not finite:
                    break
                for k, v in dict(metrics, loss=loss.item()).items():
                    sums[k] = sums.get(k, 0.0) + v
            epoch_done = epoch != last_epoch
            if epoch_done:  # (a collective under DDP: every rank sees the same epoch here)
                skips = all_skips()
                log(f"epoch {last_epoch} done; skipped so far: {skips or 'nothing'}")
            last_epoch = epoch
            grad_norm = clip_gradients(params, optimizer, scaler, args.max_grad_norm) if finite else None
            # A bad step changes no weight: a non-finite loss or gradient (fp16's scaler skips its own
            # inf steps). Too many in a row stop the run, weights kept.
            cause = ("non-finite loss" if not finite else
                     "non-finite gradient" if not scaler.is_enabled() and not math.isfinite(grad_norm) else None)
            if cause:
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                log(f"warning: step {step}: {cause}; step skipped")
                if bad_steps >= args.max_bad_steps:
                    save(os.path.join(args.out_dir, f"checkpoint-{step:06d}"))
                    raise SystemExit(stop_message(bad_steps, step, cause, args.out_dir) if master else 1)
                continue
            bad_steps = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {k: v / args.grad_accum for k, v in D.mean_over_ranks(sums, m.device).items()}
            record.update(step=step, lr=lr, grad_norm=grad_norm, pairs_per_s=pairs_per_step / (time.time() - t0), epoch=epoch)
            if epoch_done or step == args.max_steps:  # skip counts at each epoch's end and at the last step
                record["skipped"] = skips if epoch_done and step < args.max_steps else all_skips()
            if args.validation_prompts and (step == args.max_steps or due(args.validation_every, step)):
                grid, scores = validate(args, m, step, reporter, master)
                record.update(scores)
            reporter.step(record)
            if due(args.save_every, step) and step < args.max_steps:
                save(os.path.join(args.out_dir, f"checkpoint-{step:06d}"), keep=args.keep_checkpoints)

        # The end: a last (resumable) checkpoint, and OUT_DIR/unet (or lora/) for sample.py and the
        # stock diffusers pipelines, hard-linked to the checkpoint's weights; a model card beside it.
        stop.ending = "saving"  # (a signal from here on: the save and export finish, then stop.finish says so)
        reporter.close()
        final = os.path.join(args.out_dir, f"checkpoint-{step:06d}")
        save(final, keep=args.keep_checkpoints)
        stop.ending = final
        if master:
            publish(args, final, "lora" if m.lora else "unet", step, pairs_per_step, grid, argv_, log)
        log(R.done_line(args, m.lora, step, all_skips()))
        policy = None  # DDP's reducer freed while the process group lives (parallel.teardown)
        stop.finish(f"step {step} saved in {final} and exported", master)  # (a signal any rank got: every rank stops)
        parallel.teardown(own_group)
        return m


if __name__ == "__main__":
    main()
