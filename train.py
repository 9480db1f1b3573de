"""
Diffusion-RPO training (and its DPO and SFT baselines) in one plain PyTorch loop.

    python train.py                                  # RPO on the tiny preset and toy set, CPU, a minute
    python train.py --model sd15 --pretrained /models/sd15 --data pairs.jsonl --gradient_checkpointing \
                    --batch_size 8 --grad_accum 32
    python train.py --lora_rank 8                    # LoRA: only adapters train; ε_ref = adapters off
    torchrun --standalone --nproc_per_node 8 train.py --model sdxl ... [--fsdp] [--global_contrast]

Reads top to bottom: flags; the loss of one micro-batch (micro_batch_loss: the method, equation
by equation, with docs/method.md's labels E1..E9; the equations themselves are loss.py's); the
loop. Each optimizer step draws its timesteps and noise from a generator seeded by (seed, step,
micro-batch), and each item's crop and flip from (seed, epoch, index), so a resumed run replays
the same randomness as an uninterrupted one without any hidden RNG state. Under torchrun, the
few lines that involve other processes call distributed.py (docs/multi-gpu.md); checkpoints and
outputs are checkpoint.py's.
"""
import argparse
import json
import contextlib
import os
import time

import torch

import checkpoint as C
import data
import distributed as D
import loss as L
import model as M
import pickapic
import toy


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(M.PRESETS), help="preset (model.py)")
    g.add_argument("--pretrained", "--pretrained_model_name_or_path", default=None,
                   help="hub id or local diffusers folder for sd15/sdxl (default: the preset's hub id)")
    g.add_argument("--init", default=None, help="start policy and reference from this saved unet/ folder")
    g.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto: bf16 on a GPU (fastest in bench.py, no grad scaler needed), no on the CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNets (1.4x on SD1.5 in bench.py; minutes of compile time first)")
    g.add_argument("--gradient_checkpointing", action="store_true")
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
                   help="toy (pairs), toy-base (single images, for --loss sft), a .jsonl manifest, pickapic:DIR (parquet "
                        f"shards), pickapic:HUB_ID, or cache:DIR (data.py cache). Default: toy for tiny presets, "
                        f"pickapic:{pickapic.PICKAPIC_HUB} for sd15/sdxl")
    g.add_argument("--data_split", default="train", help="pickapic: the shards' split (file prefix / hub split); toy: prompts")
    g.add_argument("--shuffle_window", type=int, default=4,
                   help="pickapic:DIR: rows are shuffled across this many row groups at a time (memory: that many + 1)")
    g.add_argument("--shuffle_buffer", type=int, default=1000, help="pickapic:HUB_ID: the datasets shuffle buffer (rows)")
    g.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    g.add_argument("--style", default="winter", choices=list(toy.STYLES), help="toy set: the preferred style")
    g.add_argument("--style_fraction", type=float, default=1 / 3, help="toy-base: share of styled images")
    g.add_argument("--num_items", type=int, default=8192, help="toy sets: items per epoch")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="share of prompts replaced by '' (teaches the unconditional model that guidance needs)")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop (same for winner and loser)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flip (same for winner and loser)")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--embed", default="mean", choices=["mean", "text", "image"], help="E5: what f(c, x) embeds")
    g.add_argument("--embed_model", default=None,
                   help="CLIP for E5 (default: built-in tiny CLIP for tiny presets, else openai/clip-vit-large-patch14)")
    g = p.add_argument_group("objective")
    g.add_argument("--loss", default="rpo", choices=["rpo", "dpo", "sft"])
    g.add_argument("--beta", "--beta_dpo", type=float, default=5000.0, help="E3/E4: logit = -(beta/2)·Δ")
    g.add_argument("--tau", type=float, default=0.5, help="E6: softmax temperature of the RPO weights")
    g.add_argument("--rpo_weighting", default="outside", choices=["outside", "inside"], help="E7: paper form or LLM-RPO code form")
    g.add_argument("--timesteps", default=None, choices=["batch", "pair"],
                   help="E8: one t per micro-batch or per pair (default: batch for rpo, pair otherwise)")
    g.add_argument("--global_contrast", action="store_true",
                   help="under torchrun, rpo: contrast every winner with every loser of the *global* micro-batch "
                        "(B·W × B·W, E4-E7) instead of each rank's own B × B")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", "--train_batch_size", type=int, default=8,
                   help="pairs per device per micro-batch (RPO contrasts B×B; under torchrun the global "
                        "micro-batch is B × world size)")
    g.add_argument("--grad_accum", "--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", "--learning_rate", type=float, default=2.048e-5)
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up, then constant (Diffusion-DPO recipe)")
    g.add_argument("--max_steps", "--max_train_steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adamw_fused", "adafactor", "adamw8bit"],
                   help="auto: fused AdamW on a GPU, AdamW on the CPU. adafactor: what Diffusion-DPO's SDXL "
                        "script uses; adamw8bit needs bitsandbytes")
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_eps", type=float, default=1e-8)
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out_dir", "--output_dir", default="out/rpo-tiny")
    g.add_argument("--save_every", "--checkpointing_steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    g.add_argument("--resume", "--resume_from_checkpoint", nargs="?", const="latest", default=None,
                   help="continue from OUT_DIR's latest checkpoint, or from the checkpoint folder given")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar (logs only)")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.timesteps = args.timesteps or ("batch" if args.loss == "rpo" else "pair")
    if args.data is None:  # a real model gets real data: Pick-a-Pic v2, as in the paper
        args.data = "toy" if M.PRESETS[args.model]["pretrained"] is None else f"pickapic:{pickapic.PICKAPIC_HUB}"
    if args.embed_model is None:
        args.embed_model = "tiny" if M.PRESETS[args.model]["pretrained"] is None else "openai/clip-vit-large-patch14"
    for name in ("batch_size", "grad_accum", "max_steps", "keep_checkpoints", "max_bad_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("warmup_steps", "save_every", "seed", "num_workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be 0 or more, not {getattr(args, name)}")
    for name in ("beta", "tau", "lr", "max_grad_norm"):  # (nan fails every comparison: refused too)
        if not 0 < getattr(args, name) < float("inf"):
            p.error(f"--{name} must be a positive finite number, not {getattr(args, name)}")
    for name in ("caption_dropout", "style_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} is a probability: between 0 and 1, not {getattr(args, name)}")
    if args.resolution is not None and args.resolution <= 0:
        p.error(f"--resolution must be positive, not {args.resolution}")
    if args.lora_rank < 0:
        p.error("--lora_rank must be 0 (full fine-tune) or positive")
    if args.lora_alpha is not None and args.lora_rank == 0:
        p.error("--lora_alpha needs --lora_rank")
    if args.fsdp and args.lora_rank:
        p.error("--fsdp shards a full fine-tune; a LoRA's trainable part is small, train it with plain DDP")
    if args.fsdp and args.mixed_precision == "fp16":
        # GradScaler checks for inf per rank, and FSDP's gradients are shards: ranks could disagree
        # about skipping a step. bf16 needs no scaler.
        p.error("--fsdp with --mixed_precision fp16 is not supported; use bf16")
    args.lora_targets = ",".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return args


# ---------------------------------------------------------------------------------------
# The loss of one micro-batch: the method, in the paper's order. Shared by the loop below and
# bench.py, so what is benchmarked is what is trained.
def micro_batch_loss(m, batch, generator, args, share=None, policy=None, embedder=None, autocast=None):
    """One micro-batch -> (loss, metrics), as loss.py returns them.
    batch    what data.py yields: raw pairs (prompts, winner/loser images), a cache's tensors
             (--data cache:DIR), or already-encoded inputs {"latents", "cond", "features"}.
    args     train.py's flags (loss, timesteps, beta, tau, rpo_weighting, embed, caption_dropout).
    share    this process's rows of the global micro-batch (distributed.Share; default: all of it).
    policy   the module that runs ε_θ: m.unet, or its DDP/FSDP wrapper under torchrun.
    embedder (CLIP, tokenizer) for E5 from raw images."""
    pairs = args.loss != "sft"  # SFT trains on winners alone
    share = share or D.Share([len(batch["prompt"])])
    autocast = autocast or contextlib.nullcontext()
    # The data as the networks see it (model.py): latents z = s·VAE.encode(x) for [winners;
    # losers], the text conditioning c (caption dropout swaps in the empty prompt), and E5's
    # CLIP text and image features (none for DPO/SFT).
    latents, cond, features = model_inputs(m, batch, generator, args, share, embedder)
    with torch.no_grad():
        # E8: one t per micro-batch (RPO) or per pair (DPO), and ε; winner i and loser i share
        # both (.repeat(2)), so their errors differ by the images, not by the noise.
        T = m.scheduler.config.num_train_timesteps
        t = share.keep(L.sample_timesteps(share.total, T, args.timesteps, generator)).to(latents.device)
        noise = share.keep(L.sample_noise((share.total, *latents.shape[1:]), generator)).to(latents.device)
        if pairs:
            t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)
        # The forward process q(z_t | z_0): z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε
        noisy = m.scheduler.add_noise(latents, noise, t)
        v_pred = m.scheduler.config.prediction_type == "v_prediction"
        target = m.scheduler.get_velocity(latents, noise, t) if v_pred else noise
    with autocast:
        err = L.denoising_error(M.predict_noise(policy or m.unet, noisy, t, cond), target)  # E1, policy
    if not pairs:
        return L.sft_loss(err)  # E9: plain denoising loss on winners
    # E1 for the frozen reference: m.ref_unet, or for LoRA the same UNet with its adapters off
    # (model.reference_unet). No gradient, and under DDP no communication: it is never wrapped.
    with torch.no_grad(), autocast, M.reference_unet(m) as ref_unet:
        ref_err = L.denoising_error(M.predict_noise(ref_unet, noisy, t, cond), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    if args.loss == "dpo":
        return L.dpo_loss(err_w, err_l, ref_w, ref_l, args.beta)  # E2, E3
    # E5: f(c, x) for every winner and loser; E6: ω_ij = softmax over losers j of -(1 - cos)/τ.
    # With --global_contrast, everyone() gathers every rank's rows first, so that the matrix
    # spans the global micro-batch (4 scalars and 2 embeddings a pair cross ranks, never images).
    emb = L.combine_features(*features, args.embed, rows=len(latents))
    emb_w, emb_l = share.everyone(*emb.chunk(2))
    weights = L.rpo_weights(emb_w, emb_l, args.tau)
    err_w, err_l, ref_w, ref_l = share.everyone(err_w, err_l, ref_w, ref_l)
    return L.rpo_loss(err_w, err_l, ref_w, ref_l, weights, args.beta, args.rpo_weighting)  # E4, E7


@torch.no_grad()
def model_inputs(m, batch, generator, args, share, embedder=None):
    """batch -> (latents, cond, (CLIP text features, CLIP image features)) for micro_batch_loss.
    Random draws (caption dropout, the VAE posterior's sample z = μ + σ·n) are made for the
    global micro-batch and this process's rows kept, in this order, so every rank computes what
    one process computes for the concatenated batch."""
    if "latents" in batch:  # already encoded (bench.py, tests)
        return batch["latents"], batch["cond"], batch.get("features")
    pairs, B, rows = args.loss != "sft", share.n, (2 if args.loss != "sft" else 1) * share.total
    drop = torch.zeros(B, dtype=torch.bool)
    if args.caption_dropout > 0:  # classifier-free guidance needs ε_θ(z_t, t, "") too
        drop = share.keep(torch.rand(share.total, generator=generator)) < args.caption_dropout
    both = (lambda w, l: torch.cat([w, l])) if pairs else (lambda w, l: w)
    sizes = both(batch["original_size_w"], batch["original_size_l"])
    crops = batch["crop_top_left"].repeat(2 if pairs else 1, 1)
    if "cache_latent_w" in batch:  # --data cache:DIR: the encoders' outputs, stored
        return M.cached_inputs(m, batch, drop, sizes, crops, generator, share, rows, pairs)
    images = both(batch["winner"], batch["loser"])
    if m.vae is None:  # pixel-space presets: z = x
        latents = images.to(m.device, torch.float32)
    else:
        post = m.vae.encode(images.to(m.device, m.vae.dtype)).latent_dist
        n = share.keep(torch.randn((rows, *post.mean.shape[1:]), generator=generator, dtype=post.mean.dtype), pairs)
        latents = ((post.mean + post.std * n.to(m.device)) * m.vae_scale).float()
    prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
    cond = M.encode_prompts(m, prompts, sizes, crops, repeat=2 if pairs else 1)
    features = None
    if args.loss == "rpo":  # E5's halves, one CLIP pass for [winners; losers], each prompt once
        features = M.clip_features(*embedder, None if args.embed == "image" else prompts,
                                   None if args.embed == "text" else images)
    return latents, cond, features


# ---------------------------------------------------------------------------------------
# Set-up pieces of main()
def device_defaults(args, device):
    """GPU defaults are what bench.py measured fastest (docs/speed.md): bf16 autocast with fp32
    master weights, the reference in bf16, fused AdamW, SDPA attention, TF32 matmuls."""
    gpu = device.startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if gpu else "no"
    if args.optimizer == "auto":
        args.optimizer = "adamw_fused" if gpu else "adamw"


def make_dataset(args, world):
    """--data -> (dataset, resolution). Built before the models: a wrong path fails in seconds,
    not after loading SDXL."""
    resolution = args.resolution or M.PRESETS[args.model]["resolution"]  # also SDXL's target size in the time ids
    cached = args.data.startswith("cache:")
    try:
        dataset = data.build_dataset(args.data, args.resolution if cached else resolution, seed=args.seed,
                                     split=args.data_split, style=args.style, style_fraction=args.style_fraction,
                                     random_crop=args.random_crop, random_flip=args.random_flip,
                                     num_items=args.num_items, window=args.shuffle_window,
                                     shuffle_buffer=args.shuffle_buffer, model=args.model, pretrained=args.pretrained,
                                     embed_model=args.embed_model if args.loss == "rpo" else None)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    if args.loss != "sft" and isinstance(dataset, data.ToyImages):
        raise SystemExit("error: --data toy-base holds single images, not pairs; train it with --loss sft")
    if not hasattr(dataset, "stream") and len(dataset) < args.batch_size * world:
        raise SystemExit(f"error: --data {args.data} has {len(dataset)} pairs, fewer than --batch_size {args.batch_size}"
                         + (f" × {world} ranks" if world > 1 else ""))
    return dataset, (dataset.resolution if cached else resolution)


def make_models(args, device, dataset, resolution):
    """-> (m, policy, embedder). m: policy ε_θ (trainable), reference ε_ref (frozen), VAE, text
    encoders (model.load_models); with --lora_rank the policy is the frozen UNet + adapter and
    the reference that UNet with the adapter off (m.ref_unet is None). A cache holds what the
    encoders compute, so they are not loaded for one. policy: what the training forward calls
    (m.unet, or its DDP/FSDP wrapper). embedder: CLIP for E5 from raw images."""
    cached = args.data.startswith("cache:")
    m = M.load_models(args.model, args.pretrained, args.init, device, args.mixed_precision,
                      args.gradient_checkpointing, reference=args.loss != "sft", lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")), encoders=not cached)
    if args.compile:  # in place: state_dict keys, save_pretrained and resume stay as they are
        for unet in (m.unet, m.ref_unet):
            if unet is not None:
                unet.compile()
    m.resolution = resolution
    if cached:
        m.vae_scale, m.empty = dataset.index["vae_scale"], dataset.empty  # s of the VAE that made the cache
    if m.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"error: unsupported scheduler prediction_type {m.scheduler.config.prediction_type!r}")
    embedder = M.load_embedder(args.embed_model, device) if args.loss == "rpo" and not cached else None
    return m, D.wrap_policy(m.unet, args.fsdp, device), embedder


def describe(args, m, params, world, dataset):
    """The start-up line: what trains, on what, how many pairs per optimizer step."""
    what = f"{M.unet_size(m.unet) / 1e6:.1f}M-parameter UNet"
    if m.lora:
        what += f", LoRA rank {args.lora_rank}: {sum(p.numel() for p in params) / 1e6:.3f}M trainable"
    on = (f"{world} ranks ({'FSDP' if args.fsdp else 'DDP'}, {torch.distributed.get_backend()}, {m.device.type}), "
          f"{args.batch_size}×{args.grad_accum}×{world}") if world > 1 else f"{m.device}, {args.batch_size}×{args.grad_accum}"
    size = "(streamed)" if hasattr(dataset, "stream") else f"({len(dataset)} items)"
    return f"training {args.loss} on {args.model} ({what}) on {on} pairs/step, data {args.data} {size}"


def make_optimizer(name, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    if name in ("adamw", "adamw_fused"):  # fused: one kernel for all parameters (CUDA)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=name == "adamw_fused")
    if name == "adafactor":  # Diffusion-DPO's SDXL setting: factored second moments, fixed lr
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("error: --optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def count_skips(counts, reasons):
    for reason in reasons:  # "corrupt image: PATH" -> "corrupt image"
        kind = reason.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1


# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device, own_group = D.setup(args.device)  # torchrun: one process per device
    master = rank == 0  # logs and writes files; every rank computes
    log = print if master else (lambda *a, **k: None)
    if args.fsdp and world == 1:
        raise SystemExit("error: --fsdp shards the UNet over processes; launch with torchrun --nproc_per_node N")
    torch.manual_seed(args.seed)  # the same on every rank: identical initial LoRA adapters
    device_defaults(args, device)
    dataset, resolution = make_dataset(args, world)
    streamed = hasattr(dataset, "stream")  # the hub: read in stream order, endlessly
    skip_counts = dict(getattr(dataset, "skip_counts", {}))  # index-level (the same on every rank), or resumed
    new_skips = {}  # skips this rank met while reading (corrupt images; hub: ties, ...)

    m, policy, embedder = make_models(args, device, dataset, resolution)
    autocast = torch.autocast(device_type=m.device.type, dtype=m.dtype, enabled=args.mixed_precision != "no")

    # Optimizer (DDP's replicas are m.unet's tensors; FSDP's are shards, so AdamW's moments are
    # sharded too), and where to start.
    params = [p for p in m.unet.parameters() if p.requires_grad]  # LoRA: the adapter's A and B only
    optimizer = make_optimizer(args.optimizer, params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                               args.weight_decay)
    scaler = torch.amp.GradScaler(m.device.type, enabled=args.mixed_precision == "fp16")
    step, epoch, items_in_epoch = 0, 0, 0
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        ckpt, state = C.resume(args, m, optimizer, scaler, master)
        step, epoch, items_in_epoch = state["step"], state["epoch"], state["items_in_epoch"]
        skip_counts = state.get("skip_counts", skip_counts)
        log(f"resumed from {ckpt} at step {step}" + (f" (written by {state.get('world_size', 1)} process(es), "
                                                     f"continued by {world})" if world > 1 else ""))
    log(describe(args, m, params, world, dataset))

    def save(path, keep=None):  # every rank calls it (FSDP gathers, skips are summed); rank 0 writes
        position = dict(step=step, epoch=epoch, items_in_epoch=items_in_epoch)
        C.save(path, args, m, optimizer, scaler, position, all_skips(), master, keep)

    def all_skips():
        return {**skip_counts, **{k: skip_counts.get(k, 0) + n for k, n in D.sum_counts(new_skips).items()}}

    # -----------------------------------------------------------------------------------
    # The loop: grad_accum micro-batches, one optimizer step.
    stream = data.stream_batches(dataset, args.batch_size, args.seed, epoch, items_in_epoch, rank, world,
                                 args.num_workers)
    metrics_file = C.open_metrics(args.out_dir, step, args.resume) if master else None
    bar = None
    if not args.no_progress and master:
        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True)
    bad_steps, last_epoch = 0, epoch
    while step < args.max_steps:
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums, n_pairs, n_micro, finite, synced = {}, 0, 0, True, True
        for micro in range(args.grad_accum):
            epoch, items_in_epoch, batch = next(stream)
            count_skips(new_skips, batch["skipped"])  # found while reading: corrupt images (hub: ties, ...)
            epoch = D.latest_epoch(epoch, m.device) if streamed else epoch
            counts = D.world_counts(len(batch["prompt"]), m.device)
            if min(counts) == 0:  # (every rank alike: a rank with no pairs cannot join DDP's backward)
                continue
            generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1009 + micro)
            # DDP all-reduces gradients in the last micro-batch's backward only (no_sync before);
            # FSDP reduce-scatters every micro-batch (docs/multi-gpu.md).
            accumulate = world > 1 and not args.fsdp and micro < args.grad_accum - 1
            with policy.no_sync() if accumulate else contextlib.nullcontext():
                share = D.Share(counts, rank, global_contrast=args.global_contrast and world > 1)
                loss, metrics = micro_batch_loss(m, batch, generator, args, share, policy, embedder, autocast)
                finite = D.all_ranks(torch.isfinite(loss).item(), m.device)
                if finite or world > 1:  # DDP/FSDP: every forward needs its backward (the reducer waits)
                    scaler.scale(loss / args.grad_accum).backward()
            synced = not accumulate
            if not finite:
                break
            for k, v in dict(metrics, loss=loss.item()).items():
                sums[k] = sums.get(k, 0.0) + v
            n_pairs, n_micro = n_pairs + len(batch["prompt"]), n_micro + 1
        epoch_done = epoch != last_epoch
        if epoch_done:  # (a collective under DDP: every rank sees the same epoch here)
            skips = all_skips()
            log(f"epoch {last_epoch} done; skipped so far: {skips or 'nothing'}")
        last_epoch = epoch
        if not finite or n_pairs == 0:
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            log(f"warning: step {step}: {'non-finite loss' if not finite else 'no usable pairs'}; step skipped")
            if bad_steps >= args.max_bad_steps:
                save(os.path.join(args.out_dir, f"checkpoint-{step:06d}"))
                raise SystemExit(f"error: {bad_steps} bad steps in a row at step {step} (NaN/inf loss or no data); "
                                 f"weights before them saved in {args.out_dir}/checkpoint-{step:06d}; try a lower --lr")
            continue
        if not synced:  # DDP and the last micro-batch was skipped: its all-reduce never ran
            D.average_grads(params)
        bad_steps = 0
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: DTensor
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sums, n_pairs = D.mean_over_ranks(sums, n_pairs, m.device)
        record = {k: v / n_micro for k, v in sums.items()}
        record.update(step=step, lr=lr, grad_norm=grad_norm, pairs_per_s=n_pairs / (time.time() - t0), epoch=epoch)
        if epoch_done or step == args.max_steps:  # skip counts at each epoch's end and at the last step
            record["skipped"] = skips if epoch_done and step < args.max_steps else all_skips()
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}",
                            pairs_s=f"{record['pairs_per_s']:.1f}")
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(os.path.join(args.out_dir, f"checkpoint-{step:06d}"), keep=args.keep_checkpoints)

    # The end: a last (resumable) checkpoint, and OUT_DIR/unet (or lora/) for sample.py and the
    # stock diffusers pipelines, hard-linked to the checkpoint's weights.
    if bar is not None:
        bar.close()
    final = os.path.join(args.out_dir, f"checkpoint-{step:06d}")
    save(final, keep=args.keep_checkpoints)
    folder = "lora" if m.lora else "unet"
    out = os.path.join(args.out_dir, folder)
    if master:
        metrics_file.close()
        C.export(args.out_dir, final, folder)
    skips = all_skips()
    if skips:
        log(f"skipped (counted): {skips}")
    log(f"done: {step} steps; {'LoRA' if m.lora else 'UNet'} in {out}")
    policy = None  # DDP's reducer freed while the process group lives (distributed.teardown)
    D.teardown(own_group)
    return m


if __name__ == "__main__":
    main()
