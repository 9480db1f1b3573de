"""
Diffusion-RPO training (and its DPO and SFT baselines) in one plain PyTorch loop.

    python train.py                                  # RPO on the tiny preset and toy set, CPU, minutes
    python train.py --model sd15 --pretrained /models/sd15 --data pairs.jsonl --mixed_precision bf16 \
                    --gradient_checkpointing --batch_size 8 --grad_accum 32
    python train.py --lora_rank 8                    # LoRA: only adapters train; ε_ref = adapters off

Reads top to bottom: flags; models; data; the loss of one micro-batch (E1..E9 of
../shared/SPEC.md, via loss.py); checkpoints; the loop. Each optimizer step draws its
timesteps and noise from a generator seeded by (seed, step, micro-batch), and each item's
crop and flip from (seed, epoch, index), so a resumed run replays the same randomness as an
uninterrupted one without any hidden RNG state.
"""
import argparse
import contextlib
import glob
import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

import data
import loss as L
import model as M


def parse_args(argv=None):
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
    g = p.add_argument_group("data")
    g.add_argument("--data", default="toy", help="toy (pairs), toy-base (single images, for --loss sft), or a .jsonl manifest")
    g.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    g.add_argument("--style", default="winter", choices=list(data.STYLES), help="toy set: the preferred style")
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
    g.add_argument("--beta", type=float, default=5000.0, help="E3/E4: logit = -(beta/2)·Δ")
    g.add_argument("--tau", type=float, default=0.5, help="E6: softmax temperature of the RPO weights")
    g.add_argument("--rpo_weighting", default="outside", choices=["outside", "inside"], help="E7: paper form or LLM-RPO code form")
    g.add_argument("--timesteps", default=None, choices=["batch", "pair"],
                   help="E8: one t per micro-batch or per pair (default: batch for rpo, pair otherwise)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=8, help="pairs per device per micro-batch (RPO contrasts B×B)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2.048e-5)
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up, then constant (Diffusion-DPO recipe)")
    g.add_argument("--max_steps", type=int, default=300, help="optimizer steps")
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
    g.add_argument("--out_dir", default="out/rpo-tiny")
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT_DIR's latest checkpoint, or from the checkpoint folder given")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar (logs only)")
    args = p.parse_args(argv)
    args.timesteps = args.timesteps or ("batch" if args.loss == "rpo" else "pair")
    if args.embed_model is None:
        args.embed_model = "tiny" if M.PRESETS[args.model]["pretrained"] is None else "openai/clip-vit-large-patch14"
    for name in ("batch_size", "grad_accum", "max_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.tau <= 0:
        p.error("--tau must be positive")
    if args.lora_rank < 0:
        p.error("--lora_rank must be 0 (full fine-tune) or positive")
    if args.lora_alpha is not None and args.lora_rank == 0:
        p.error("--lora_alpha needs --lora_rank")
    args.lora_targets = ",".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return args


# ---------------------------------------------------------------------------------------
# Checkpoints: diffusers unet/ layout + optimizer tensors in safetensors + JSON; no pickle.
# LoRA runs save only the adapter, in lora/ instead of unet/: lora/pytorch_lora_weights.safetensors
# in the diffusers LoRA format (model.save_lora), so a checkpoint's lora/ and the final
# OUT_DIR/lora/ both load with the stock pipe.load_lora_weights(dir). A subfolder (not the
# file loose in checkpoint-N/ or OUT_DIR/) mirrors unet/, so one code path links either.
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


def optimizer_to_tensors(optimizer):
    """Tensors of the optimizer state for safetensors; plain numbers (Adafactor's step) for JSON."""
    sd = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    return tensors, dict(param_groups=sd["param_groups"], scalars=scalars)


def optimizer_from_tensors(optimizer, tensors, meta):
    state = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path, m, optimizer, scaler, state, keep=None):
    """Write everything into PATH.tmp, then rename: a crash mid-write never leaves a
    half-written checkpoint that --resume would pick up."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if m.lora:
        M.save_lora(m, os.path.join(tmp, "lora"))
    else:
        m.unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    tensors, optimizer_meta = optimizer_to_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, optimizer=optimizer_meta, scaler=scaler.state_dict() if scaler.is_enabled() else None), f, indent=1)
    if os.path.exists(path):  # re-saving the same step: swap the old one out first
        shutil.rmtree(path)
    os.rename(tmp, path)
    if keep:
        for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "checkpoint-*[0-9]")))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir):
    found = sorted(glob.glob(os.path.join(out_dir, "checkpoint-*[0-9]")))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------
# The loss of one micro-batch, from latents and conditioning on: shared by train.py's loop and
# bench.py, so what is benchmarked is what is trained.
def diffusion_loss(m, latents, cond, generator, loss="rpo", timesteps="batch", beta=5000.0, weights=None,
                   rpo_weighting="outside", autocast=contextlib.nullcontext()):
    """latents: [winners; losers] (2B, C, H, W) for rpo/dpo, winners (B, ...) for sft; cond for
    the same rows. weights: the B×B RPO weights (E6). Returns (loss, metrics) as loss.py does."""
    pairs = loss != "sft"
    B = latents.shape[0] // 2 if pairs else latents.shape[0]
    with torch.no_grad():
        # E8: t and ε for this micro-batch; winner i and loser i share both (.repeat(2)).
        t = L.sample_timesteps(B, m.scheduler.config.num_train_timesteps, timesteps, generator, latents.device)
        noise = L.sample_noise(latents[:B].shape, generator, latents.device)
        if pairs:
            t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)
        # q(z_t | z_0): z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε
        noisy = m.scheduler.add_noise(latents, noise, t)
        v_pred = m.scheduler.config.prediction_type == "v_prediction"
        target = m.scheduler.get_velocity(latents, noise, t) if v_pred else noise
    with autocast:
        pred = M.predict_noise(m.unet, noisy, t, cond)
    err = L.denoising_error(pred, target)  # E1 for the policy
    if not pairs:
        return L.sft_loss(err)  # E9
    # E1, reference: m.ref_unet, or for LoRA the policy UNet with its adapters off. This runs
    # after the policy forward and before its backward; model.reference_unet explains why that
    # is safe (the adapters are back on, with requires_grad, when the block exits).
    with torch.no_grad(), autocast, M.reference_unet(m) as ref_unet:
        ref_err = L.denoising_error(M.predict_noise(ref_unet, noisy, t, cond), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    if loss == "dpo":
        return L.dpo_loss(err_w, err_l, ref_w, ref_l, beta)  # E3
    return L.rpo_loss(err_w, err_l, ref_w, ref_l, weights, beta, rpo_weighting)  # E4, E7


def main(argv=None):
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # GPU defaults are what bench.py measured fastest (README, "Speed and memory"): bf16 autocast
    # with fp32 master weights, the reference in bf16 on the GPU, fused AdamW, SDPA attention.
    gpu = device.startswith("cuda")
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if gpu else "no"
    if args.optimizer == "auto":
        args.optimizer = "adamw_fused" if gpu else "adamw"

    # -----------------------------------------------------------------------------------
    # Models: policy ε_θ (trainable), reference ε_ref (frozen), VAE, text encoder(s).
    # With --lora_rank the policy is the frozen UNet + adapter and the reference that UNet with
    # the adapter off (model.reference_unet): m.ref_unet is None, and only the adapter trains.
    m = M.load_models(args.model, args.pretrained, args.init, device, args.mixed_precision,
                      args.gradient_checkpointing, reference=args.loss != "sft", lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")))
    if args.compile:  # in place: state_dict keys, save_pretrained and resume stay as they are
        m.unet.compile()
        if m.ref_unet is not None:
            m.ref_unet.compile()
    resolution = m.resolution = args.resolution or m.resolution  # also SDXL's target size in the time ids
    pred_type = m.scheduler.config.prediction_type
    if pred_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"error: unsupported scheduler prediction_type {pred_type!r}")
    embedder = M.load_embedder(args.embed_model, device) if args.loss == "rpo" else None

    # -----------------------------------------------------------------------------------
    # Data: preference pairs (or single images for SFT on toy-base).
    try:
        dataset = data.build_dataset(args.data, resolution, seed=args.seed, style=args.style,
                                     style_fraction=args.style_fraction, random_crop=args.random_crop,
                                     random_flip=args.random_flip, num_items=args.num_items)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    if args.loss != "sft" and isinstance(dataset, data.ToyImages):
        raise SystemExit("error: --data toy-base holds single images, not pairs; train it with --loss sft")
    if len(dataset) < args.batch_size:
        raise SystemExit(f"error: --data {args.data} has {len(dataset)} pairs, fewer than --batch_size {args.batch_size}")
    skip_counts = dict(getattr(dataset, "skip_counts", {}))  # manifest-level skips, counted at load

    def data_stream(epoch, batch_in_epoch):
        """Batches of item indices in a per-epoch permutation seeded by (seed, epoch); resuming
        at (epoch, batch_in_epoch) replays exactly the batches an uninterrupted run would see."""
        while True:
            dataset.epoch = epoch
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).tolist()
            batches = [order[i:i + args.batch_size] for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[batch_in_epoch:],
                                                 collate_fn=data.collate_pairs, num_workers=args.num_workers)
            for batch in loader:
                batch_in_epoch += 1
                yield epoch, batch_in_epoch, batch
            epoch, batch_in_epoch = epoch + 1, 0

    # -----------------------------------------------------------------------------------
    # The loss of one micro-batch.
    autocast = torch.autocast(device_type=m.device.type, dtype=m.dtype, enabled=args.mixed_precision != "no")

    def micro_batch_loss(batch, generator):
        prompts, B = batch["prompt"], len(batch["prompt"])
        if args.caption_dropout > 0:  # classifier-free guidance needs ε_θ(z_t, t, "") too
            drop = torch.rand(B, generator=generator) < args.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        pairs = args.loss != "sft"
        images = torch.cat([batch["winner"], batch["loser"]]) if pairs else batch["winner"]
        with torch.no_grad():
            # SPEC §1: z = s·VAE.encode(x) (the images themselves for pixel-space presets).
            latents = M.encode_images(m, images, generator)
            sizes = torch.cat([batch["original_size_w"], batch["original_size_l"]]) if pairs else batch["original_size_w"]
            crops = batch["crop_top_left"].repeat(2 if pairs else 1, 1)
            cond = M.encode_prompts(m, prompts, sizes, crops, repeat=2 if pairs else 1)
        weights = None
        if args.loss == "rpo":
            emb_w = data.clip_embeddings(*embedder, prompts, batch["winner"], args.embed)  # E5
            emb_l = data.clip_embeddings(*embedder, prompts, batch["loser"], args.embed)
            weights = L.rpo_weights(emb_w, emb_l, args.tau)  # E6
        return diffusion_loss(m, latents, cond, generator, args.loss, args.timesteps, args.beta, weights,
                              args.rpo_weighting, autocast)

    # -----------------------------------------------------------------------------------
    # Optimizer, and where to start.
    params = [p for p in m.unet.parameters() if p.requires_grad]  # LoRA: the adapter's A and B only
    optimizer = make_optimizer(args.optimizer, params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                               args.weight_decay)
    scaler = torch.amp.GradScaler(m.device.type, enabled=args.mixed_precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        ckpt = latest_checkpoint(args.out_dir) if args.resume == "latest" else args.resume
        if ckpt is None or not os.path.isfile(os.path.join(ckpt, "state.json")):
            raise SystemExit(f"error: --resume found no checkpoint in '{ckpt or args.out_dir}'")
        with open(os.path.join(ckpt, "state.json")) as f:
            state = json.load(f)
        # The reference must be the same starting UNet, and the weights the same shape. (.get: a
        # checkpoint from before the LoRA flags was a full fine-tune with the default targets.)
        defaults = dict(lora_rank=0, lora_alpha=None, lora_targets=",".join(M.LORA_TARGETS))
        keys = ("model", "init", "loss", "lora_rank") + (("lora_alpha", "lora_targets") if args.lora_rank else ())
        for key in keys:
            if state["args"].get(key, defaults.get(key)) != getattr(args, key):
                raise SystemExit(f"error: checkpoint {ckpt} was trained with --{key} {state['args'].get(key, defaults.get(key))}, "
                                 f"not {getattr(args, key)}")
        if m.lora:  # the adapter only: the frozen base is rebuilt identically by load_models
            M.load_lora(m, os.path.join(ckpt, "lora"))
        else:
            m.unet.load_state_dict(load_file(os.path.join(ckpt, "unet", "diffusion_pytorch_model.safetensors"), device=str(m.device)))
        optimizer_from_tensors(optimizer, load_file(os.path.join(ckpt, "optimizer.safetensors"), device=str(m.device)),
                               state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = load_file(os.path.join(ckpt, "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        skip_counts = state.get("skip_counts", skip_counts)
        print(f"resumed from {ckpt} at step {step}")

    def checkpoint(path, keep=None):
        state = dict(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, skip_counts=skip_counts, args=vars(args),
                     rng="timesteps/noise: Generator(seed, step, micro-batch); crops: (seed, epoch, index)")
        save_checkpoint(path, m, optimizer, scaler, state, keep)

    what = f"{M.unet_size(m.unet) / 1e6:.1f}M-parameter UNet"
    if m.lora:
        what += f", LoRA rank {args.lora_rank}: {sum(p.numel() for p in params) / 1e6:.3f}M trainable"
    print(f"training {args.loss} on {args.model} ({what}) on {m.device}, "
          f"{args.batch_size}×{args.grad_accum} pairs/step, data {args.data} ({len(dataset)} items)")

    # -----------------------------------------------------------------------------------
    # The loop.
    stream = data_stream(epoch, batch_in_epoch)
    metrics_file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a")
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True)
    bad_steps, last_epoch = 0, epoch
    while step < args.max_steps:
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums, n_pairs, n_micro, finite = {}, 0, 0, True
        for micro in range(args.grad_accum):
            epoch, batch_in_epoch, batch = next(stream)
            for reason in batch["skipped"]:  # corrupt images found while decoding
                kind = " ".join(reason.split(" ")[:2])  # e.g. "corrupt image"
                skip_counts[kind] = skip_counts.get(kind, 0) + 1
            if batch["winner"] is None or len(batch["prompt"]) == 0:
                continue
            generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1009 + micro)
            loss, metrics = micro_batch_loss(batch, generator)
            if not torch.isfinite(loss):
                finite = False
                break
            scaler.scale(loss / args.grad_accum).backward()
            for k, v in dict(metrics, loss=loss.item()).items():
                sums[k] = sums.get(k, 0.0) + v
            n_pairs += len(batch["prompt"])
            n_micro += 1
        if epoch != last_epoch and skip_counts:
            print(f"epoch {last_epoch} done; skipped so far: {skip_counts}")
        last_epoch = epoch
        if not finite or n_pairs == 0:
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            print(f"warning: step {step}: {'non-finite loss' if not finite else 'no usable pairs'}; step skipped")
            if bad_steps >= args.max_bad_steps:
                checkpoint(os.path.join(args.out_dir, f"checkpoint-{step:06d}"))
                raise SystemExit(f"error: {bad_steps} bad steps in a row at step {step} (NaN/inf loss or no data); "
                                 f"weights before them saved in {args.out_dir}/checkpoint-{step:06d}; try a lower --lr")
            continue
        bad_steps = 0
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        record = {k: v / n_micro for k, v in sums.items()}
        record.update(step=step, lr=lr, grad_norm=grad_norm, pairs_per_s=n_pairs / (time.time() - t0), epoch=epoch)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}",
                            pairs_s=f"{record['pairs_per_s']:.1f}")
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            checkpoint(os.path.join(args.out_dir, f"checkpoint-{step:06d}"), keep=args.keep_checkpoints)

    # -----------------------------------------------------------------------------------
    # The end: a last checkpoint (resumable) and OUT_DIR/unet (for sample.py and the
    # stock diffusers pipelines), hard-linked to the checkpoint's weights to save disk.
    # LoRA runs: OUT_DIR/lora/pytorch_lora_weights.safetensors instead (pipe.load_lora_weights).
    if bar is not None:
        bar.close()
    metrics_file.close()
    final = os.path.join(args.out_dir, f"checkpoint-{step:06d}")
    checkpoint(final, keep=args.keep_checkpoints)
    folder = "lora" if m.lora else "unet"
    unet_dir, tmp = os.path.join(args.out_dir, folder), os.path.join(args.out_dir, folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(os.path.join(final, folder)):
        src = os.path.join(final, folder, name)
        try:
            os.link(src, os.path.join(tmp, name))
        except OSError:
            shutil.copy2(src, os.path.join(tmp, name))
    shutil.rmtree(unet_dir, ignore_errors=True)
    os.rename(tmp, unet_dir)
    if skip_counts:
        print(f"skipped (counted): {skip_counts}")
    print(f"done: {step} steps; {'LoRA' if m.lora else 'UNet'} in {unet_dir}")
    return m


if __name__ == "__main__":
    main()
