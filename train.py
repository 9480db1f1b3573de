"""
Diffusion-RPO training (and its DPO and SFT baselines) in one plain PyTorch loop.

    python train.py                                  # RPO on the tiny preset and toy set, CPU, minutes
    python train.py --model sd15 --pretrained /models/sd15 --data pairs.jsonl --mixed_precision bf16 \
                    --gradient_checkpointing --batch_size 8 --grad_accum 32
    python train.py --lora_rank 8                    # LoRA: only adapters train; ε_ref = adapters off
    torchrun --standalone --nproc_per_node 8 train.py --model sdxl ... [--fsdp] [--global_contrast]

Reads top to bottom: flags; models; data; the loss of one micro-batch (E1..E9 of
../shared/SPEC.md, via loss.py); checkpoints; the loop. Each optimizer step draws its
timesteps and noise from a generator seeded by (seed, step, micro-batch), and each item's
crop and flip from (seed, epoch, index), so a resumed run replays the same randomness as an
uninterrupted one without any hidden RNG state.

Data parallel (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT): one process per
device, each with a replica of the policy (DDP) or a shard of it (--fsdp), and a disjoint slice
of every *global* micro-batch of batch_size × world pairs. Every rank draws t and ε for the
whole global micro-batch from the shared generator and keeps its own rows, so N ranks with
--batch_size B see exactly what one process with --batch_size N·B sees; with --global_contrast
the RPO matrix (E4-E7) spans the global batch too, and the run *is* that one-process run,
split (tests/test_distributed.py). Rank 0 alone logs and writes metrics and checkpoints.
"""
import argparse
import contextlib
import functools
import glob
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

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
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy UNet, its gradients and AdamW state over the ranks "
                        "(FSDP2 fully_shard) instead of replicating them (DDP); full fine-tunes only")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="toy (pairs), toy-base (single images, for --loss sft), a .jsonl manifest, pickapic:DIR (parquet "
                        f"shards), pickapic:HUB_ID, or cache:DIR (data.py cache). Default: toy for tiny presets, "
                        f"pickapic:{data.PICKAPIC_HUB} for sd15/sdxl")
    g.add_argument("--data_split", default="train", help="pickapic: the shards' split (file prefix / hub split); toy: prompts")
    g.add_argument("--shuffle_window", type=int, default=4,
                   help="pickapic:DIR: rows are shuffled across this many row groups at a time (memory: that many + 1)")
    g.add_argument("--shuffle_buffer", type=int, default=1000, help="pickapic:HUB_ID: the datasets shuffle buffer (rows)")
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
    g.add_argument("--global_contrast", action="store_true",
                   help="under torchrun, rpo: contrast every winner with every loser of the *global* micro-batch "
                        "(B·W × B·W, E4-E7) instead of each rank's own B × B")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=8,
                   help="pairs per device per micro-batch (RPO contrasts B×B; under torchrun the global "
                        "micro-batch is B × world size)")
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
    if args.data is None:  # a real model gets real data: Pick-a-Pic v2, as in the paper
        args.data = "toy" if M.PRESETS[args.model]["pretrained"] is None else f"pickapic:{data.PICKAPIC_HUB}"
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
    if args.fsdp and args.lora_rank:
        p.error("--fsdp shards a full fine-tune; a LoRA's trainable part is small, train it with plain DDP")
    if args.fsdp and args.mixed_precision == "fp16":
        # GradScaler checks for inf per rank, and FSDP's gradients are shards: ranks could disagree
        # about skipping a step. bf16 needs no scaler.
        p.error("--fsdp with --mixed_precision fp16 is not supported; use bf16")
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
    """Tensors of the optimizer state for safetensors; plain numbers (Adafactor's step) for JSON.
    `optimizer`: an optimizer, or a state dict in its format (FSDP's, gathered: fsdp_full_state)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    return tensors, dict(param_groups=sd["param_groups"], scalars=scalars)


def optimizer_state_from_tensors(tensors, meta):
    """The inverse of optimizer_to_tensors: a state dict in optimizer.state_dict()'s format."""
    state = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_from_tensors(optimizer, tensors, meta):
    optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta))


def load_unet_weights(folder, device):
    """A saved unet/ folder's weights as one state dict. save_pretrained splits a UNet above
    10 GB into several diffusion_pytorch_model-0000N-of-0000M.safetensors (SDXL in fp32 is 10.3)."""
    weights = {}
    for f in sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors"))):
        weights.update(load_file(f, device=str(device)))
    return weights


def save_checkpoint(path, m, optimizer, scaler, state, keep=None, unet=None):
    """Write everything into PATH.tmp, then rename: a crash mid-write never leaves a
    half-written checkpoint that --resume would pick up. `unet` (default m.unet) and `optimizer`
    (an optimizer or its state dict) may be the full copies gathered from FSDP's shards."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if m.lora:
        M.save_lora(m, os.path.join(tmp, "lora"))
    else:
        (unet or m.unet).save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    tensors, optimizer_meta = optimizer_to_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and dist.is_initialized():
        # this process's device only: get_rng_state_all() would open a CUDA context (~0.5 GB)
        # on every GPU of the node from rank 0. (Informational: training draws on CPU generators.)
        rng[f"torch_cuda{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
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
# Data parallel pieces (torchrun). Ranks hold disjoint slices of every global micro-batch; the
# few tensors that must cross ranks are per-pair scalars and embeddings, never images.
def world_counts(n, device):
    """Every rank's number of usable pairs in this micro-batch (one all_gather of an int). Ranks
    can differ when corrupt images were skipped; a rank with 0 makes every rank skip the
    micro-batch, since DDP's backward is a collective that all ranks must join."""
    mine = torch.tensor([n], device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(c) for c in every]


def all_ranks(flag, device):
    """True when `flag` holds on every rank (an all_reduce MIN of one number): decisions that
    change which collectives run next (skip a step, stop) must be the same on all ranks."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_rows(x, counts):
    """Rows x (n_r, ...) of every rank r, concatenated in rank order: (Σ_r n_r, ...), i.e. the
    rows one process would hold for the concatenated batch. Autograd-aware: backward hands each
    rank the gradient of its *own* rows, summed over the ranks' graphs (a reduce-scatter).
    --global_contrast relies on that sum: every rank computes the same global loss L from the
    gathered rows, so rank r's parameter gradient is W · ∂L/∂(rank r's rows) · ∂rows/∂θ, and
    DDP's (or FSDP's) average over W ranks, (1/W) Σ_r W · ..., is exactly ∂L/∂θ (no rescaling).
    counts: every rank's n_r (world_counts); rows are zero-padded to max(counts) for the
    collective, which needs equal shapes, and the padding dropped again."""
    import torch.distributed._functional_collectives as fc
    n = max(counts)
    if x.shape[0] < n:
        x = torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])
    every = fc.wait_tensor(fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))  # (W·n, ...)
    if all(c == n for c in counts):
        return every
    return torch.cat([every[r * n:r * n + c] for r, c in enumerate(counts)])


@torch.no_grad()
def encode_latents(m, images, generator, rows=None, total_rows=None):
    """z = s·VAE.encode(x) (SPEC §1), = M.encode_images when rows is None. Under DDP, rows are
    this rank's row indices in the global [all winners; all losers] batch of total_rows: the
    VAE posterior's sample z = μ + σ·n is drawn for all total_rows (the draw M.encode_images
    makes, via diffusers' randn_tensor: CPU generator, the VAE's dtype) and rows picked, so
    the latents equal one process's on the concatenated batch and the generator advances alike
    on every rank (the t and ε draws after it stay in step)."""
    if m.vae is None or rows is None:
        return M.encode_images(m, images, generator)
    post = m.vae.encode(images.to(m.device, m.vae.dtype)).latent_dist
    n = torch.randn((total_rows, *post.mean.shape[1:]), generator=generator, dtype=post.mean.dtype)[rows]
    return ((post.mean + post.std * n.to(m.device)) * m.vae_scale).float()


@torch.no_grad()
def cached_inputs(m, batch, empty, generator, drop, rows=None, total_rows=None, pairs=True):
    """--data cache:DIR: what encode_latents, M.encode_prompts and the E5 CLIP would compute,
    from data.py's cache. The VAE posterior's sample z = s·(μ + σ·n) is drawn here exactly as
    encode_latents draws it (n for all total_rows, this rank's rows kept), so a cached batch
    gives the raw batch's latents, and the generator advances alike. drop: the caption-dropout
    mask, which swaps in `empty`, the cached empty prompt's states (CachedPairs.empty). Returns latents, cond and the E5 halves
    (text features (B, D), image features (rows, D)) for data.combine_features."""
    cat = lambda key: torch.cat([batch[key + "_w"], batch[key + "_l"]]) if pairs else batch[key + "_w"]
    z = cat("cache_latent").float()
    if "cache_latent_std_w" in batch:
        total_rows = total_rows or len(z)
        n = torch.randn((total_rows, *z.shape[1:]), generator=generator, dtype=torch.float32)
        z = z + cat("cache_latent_std").float() * (n if rows is None else n[rows])
    latents = (z * m.vae_scale).to(m.device)

    def pick(key):  # the prompt's cached tensor, or the empty prompt's where the caption was dropped
        x = batch[key]
        return torch.where(drop.view(-1, *[1] * (x.dim() - 1)), empty[key.removeprefix("cache_")].to(x.dtype), x)

    hidden = pick("cache_text_hidden").to(m.dtype)
    pooled = pick("cache_text_pooled").to(m.dtype) if "cache_text_pooled" in batch else None
    sizes = torch.cat([batch["original_size_w"], batch["original_size_l"]]) if pairs else batch["original_size_w"]
    crops = batch["crop_top_left"].repeat(2 if pairs else 1, 1)
    cond = M.text_conditioning(m, hidden, pooled, sizes, crops, repeat=2 if pairs else 1)
    features = (pick("cache_clip_text").float().to(m.device), cat("cache_clip_image").float().to(m.device))
    return latents, cond, features


def shard_unet(unet):
    """--fsdp: FSDP2 (fully_shard) on every ResNet and transformer block, then every down/mid/up
    block (their remaining convs, norms, samplers), then the root (conv_in/out, time and text
    embeddings). Each parameter lives in its innermost group, as 1/W of a flat fp32 shard per
    rank; a group's full weights are all-gathered just before its forward (and again for its
    backward) and freed after, and its gradients reduce-scattered (averaged) as soon as they
    exist. So one rank holds 1/W of weights, gradients and AdamW moments plus one block's full
    weights at a time: small groups keep that transient small (SDXL's largest transformer block
    is ~35M parameters; whole up_blocks[0] would be ~1B). Params stay fp32 and autocast does
    the bf16 compute, as without FSDP (so the numbers match DDP's; a MixedPrecisionPolicy with
    bf16 params would halve the all-gather traffic but change the numerics)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import fully_shard
    inner = [mod for mod in unet.modules() if isinstance(mod, (BasicTransformerBlock, ResnetBlock2D))]
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    for mod in inner + blocks + [unet]:
        fully_shard(mod)
    return unet


def trainable_names(unet):
    # The order of the optimizer's parameters (train.py builds it from unet.parameters()): the
    # single-device optimizer state numbers parameters in this order, FSDP's names them.
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def fsdp_full_state(unet, optimizer, master):
    """--fsdp checkpoints: gather the sharded UNet and AdamW state into full CPU tensors on rank 0
    (collectives: every rank calls this). Returns, on rank 0, a plain UNet2DConditionModel with
    those weights (so save_pretrained writes the same unet/ as a single-device run) and the
    optimizer state in the single-device format (parameters numbered, not named), so a
    checkpoint resumes on any number of ranks, with or without FSDP; (None, None) elsewhere."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, rank 0, CPU
    weights = dcp.get_model_state_dict(unet, options=options)
    optim = dcp.get_optimizer_state_dict(unet, optimizer, options=options)
    if not master:
        return None, None
    with torch.device("meta"):  # no memory: the gathered CPU tensors are assigned below
        plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(weights, assign=True)
    index = {name: i for i, name in enumerate(trainable_names(unet))}
    optim = {"state": {index[k]: v for k, v in optim["state"].items()},
             "param_groups": [dict(g, params=[index[k] for k in g["params"]]) for g in optim["param_groups"]]}
    return plain, optim


def fsdp_load_state(unet, optimizer, weights, optim_state):
    """--fsdp resume: full weights and a single-device optimizer state dict (any checkpoint of
    this script) -> every rank's shards. Rank 0 alone reads the checkpoint and passes it here;
    the other ranks pass {} and receive the tensors from it one by one (broadcast_from_rank0),
    each keeping its slice: one full copy in host memory per node, not one per rank (SDXL's
    weights and AdamW state are 31 GB)."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_model_state_dict(unet, weights, options=options)
    if optim_state:
        names = trainable_names(unet)
        optim_state = {"state": {names[i]: v for i, v in optim_state["state"].items()},
                       "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                        for g in optim_state["param_groups"]]}
    dcp.set_optimizer_state_dict(unet, optimizer, optim_state, options=options)


# ---------------------------------------------------------------------------------------
# The loss of one micro-batch, from latents and conditioning on: shared by train.py's loop and
# bench.py, so what is benchmarked is what is trained.
def diffusion_loss(m, latents, cond, generator, loss="rpo", timesteps="batch", beta=5000.0, weights=None,
                   rpo_weighting="outside", autocast=contextlib.nullcontext(), policy=None, rows=None, gather=None):
    """latents: [winners; losers] (2B, C, H, W) for rpo/dpo, winners (B, ...) for sft; cond for
    the same rows. weights: the B×B RPO weights (E6). Returns (loss, metrics) as loss.py does.
    Data parallel (train.py under torchrun; defaults = one process):
      policy  the module that runs ε_θ: the DDP wrapper of m.unet (default: m.unet itself)
      rows    (offset, total): these are pairs [offset, offset + B) of a global micro-batch of
              `total` pairs. t and ε are drawn for all `total` and this slice kept (E8), so
              every rank draws what one process would for these pairs, and with one t per
              batch all ranks share the same t.
      gather  --global_contrast (gather_rows with every rank's counts): E4-E7 over the global
              batch; `weights` is then the global (total × total) ω."""
    pairs = loss != "sft"
    B = latents.shape[0] // 2 if pairs else latents.shape[0]
    offset, total = rows or (0, B)
    mine = slice(offset, offset + B)
    with torch.no_grad():
        # E8: t and ε for this micro-batch; winner i and loser i share both (.repeat(2)).
        t = L.sample_timesteps(total, m.scheduler.config.num_train_timesteps, timesteps, generator)[mine]
        t = t.to(latents.device)
        noise = L.sample_noise((total, *latents.shape[1:]), generator)[mine].to(latents.device)
        if pairs:
            t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)
        # q(z_t | z_0): z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε
        noisy = m.scheduler.add_noise(latents, noise, t)
        v_pred = m.scheduler.config.prediction_type == "v_prediction"
        target = m.scheduler.get_velocity(latents, noise, t) if v_pred else noise
    with autocast:
        pred = M.predict_noise(policy or m.unet, noisy, t, cond)
    err = L.denoising_error(pred, target)  # E1 for the policy
    if not pairs:
        return L.sft_loss(err)  # E9
    # E1, reference: m.ref_unet, or for LoRA the policy UNet with its adapters off. This runs
    # after the policy forward and before its backward; model.reference_unet explains why that
    # is safe (the adapters are back on, with requires_grad, when the block exits). Under DDP it
    # is m.unet, the module inside the wrapper: no DDP hooks, no gradient, no communication.
    with torch.no_grad(), autocast, M.reference_unet(m) as ref_unet:
        ref_err = L.denoising_error(M.predict_noise(ref_unet, noisy, t, cond), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    if loss == "dpo":
        return L.dpo_loss(err_w, err_l, ref_w, ref_l, beta)  # E3
    if gather is not None:
        # --global_contrast: E4's Δ_ij needs every winner's and every loser's gap, so gather the
        # four per-pair errors of every rank: 4 scalars a pair (plus the E5 embeddings gathered
        # for ω), the contrast matrix (B·W)² scalars, next to nothing beside a UNet. Every rank
        # then computes the same global E7 loss; gather_rows explains why the gradients need no
        # rescaling.
        err_w, err_l, ref_w, ref_l = gather(torch.stack([err_w, err_l, ref_w, ref_l], dim=1)).unbind(1)
    return L.rpo_loss(err_w, err_l, ref_w, ref_l, weights, beta, rpo_weighting)  # E4, E7


def main(argv=None):
    args = parse_args(argv)
    # -----------------------------------------------------------------------------------
    # Data parallel: torchrun (or any launcher) sets RANK/LOCAL_RANK/WORLD_SIZE and the
    # rendezvous address; without them this is one process and the lines below do nothing.
    # One device per rank: cuda:LOCAL_RANK with NCCL, or the CPU with gloo (no GPU, --device cpu).
    ddp = int(os.environ.get("RANK", "-1")) != -1
    if ddp:
        gpu = torch.cuda.is_available() and args.device != "cpu"
        own_group = not dist.is_initialized()  # a caller (a test) may have made the group already
        if own_group:
            dist.init_process_group(backend="nccl" if gpu else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = f"cuda:{local_rank}" if gpu else "cpu"  # --device cuda[:N] means "the GPUs" here
        if gpu:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    master = rank == 0  # logs, writes metrics.jsonl and checkpoints; every rank computes
    log = print if master else (lambda *a, **k: None)
    if args.fsdp and not ddp:
        raise SystemExit("error: --fsdp shards the UNet over processes; launch with torchrun --nproc_per_node N")
    torch.manual_seed(args.seed)  # the same on every rank: identical initial LoRA adapters
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
    # Data first (a wrong path should fail in seconds, not after loading SDXL): preference
    # pairs, single images for SFT on toy-base, or a cache of latents and text states.
    resolution = args.resolution or M.PRESETS[args.model]["resolution"]  # also SDXL's target size in the time ids
    cached = args.data.startswith("cache:")
    try:
        dataset = data.build_dataset(args.data, args.resolution if cached else resolution, seed=args.seed,
                                     split=args.data_split, style=args.style, style_fraction=args.style_fraction,
                                     random_crop=args.random_crop,
                                     random_flip=args.random_flip, num_items=args.num_items, window=args.shuffle_window,
                                     shuffle_buffer=args.shuffle_buffer, model=args.model, pretrained=args.pretrained,
                                     embed_model=args.embed_model if args.loss == "rpo" else None)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    streamed = isinstance(dataset, data.PickapicHub)  # no length, no index: read in order, endlessly
    if cached:
        resolution = dataset.resolution
    if args.loss != "sft" and isinstance(dataset, data.ToyImages):
        raise SystemExit("error: --data toy-base holds single images, not pairs; train it with --loss sft")
    global_batch = args.batch_size * world  # one micro-batch of all ranks together
    if not streamed and len(dataset) < global_batch:
        raise SystemExit(f"error: --data {args.data} has {len(dataset)} pairs, fewer than --batch_size {args.batch_size}"
                         + (f" × {world} ranks" if ddp else ""))
    skip_counts = dict(getattr(dataset, "skip_counts", {}))  # index-level (the same on every rank), or resumed
    new_skips = {}  # skips this rank met while reading (corrupt images; hub: ties, ...); summed by all_skips()

    # -----------------------------------------------------------------------------------
    # Models: policy ε_θ (trainable), reference ε_ref (frozen), VAE, text encoder(s).
    # With --lora_rank the policy is the frozen UNet + adapter and the reference that UNet with
    # the adapter off (model.reference_unet): m.ref_unet is None, and only the adapter trains.
    m = M.load_models(args.model, args.pretrained, args.init, device, args.mixed_precision,
                      args.gradient_checkpointing, reference=args.loss != "sft", lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")),
                      encoders=not cached)  # a cache holds what the VAE and text encoders would compute
    if args.compile:  # in place: state_dict keys, save_pretrained and resume stay as they are
        m.unet.compile()
        if m.ref_unet is not None:
            m.ref_unet.compile()
    # The policy under data parallelism. m.unet stays the UNet itself (the reference forward,
    # LoRA's adapter switch and saving use it); `policy` is what the training forward calls.
    #   DDP: a replica per rank; after backward, gradients are averaged over ranks (all-reduce in
    #   buckets, overlapping the backward). Only parameters with requires_grad are synchronised,
    #   so a LoRA run all-reduces its adapters only. find_unused_parameters=False: every trainable
    #   parameter is used every step (no extra graph walk). gradient_as_bucket_view: gradients
    #   live in the all-reduce buckets, not in a second copy (SDXL: 10 GB saved).
    #   FSDP (--fsdp): shard_unet shards m.unet in place; the reference stays a full, frozen
    #   copy in the compute dtype on every rank (bf16 SDXL: 5.1 GB; sharding it too would save
    #   that but all-gather it on every forward), computed without communication.
    policy = m.unet
    if args.fsdp:
        policy = shard_unet(m.unet)
    elif ddp:
        policy = DDP(m.unet, device_ids=[local_rank] if gpu else None, find_unused_parameters=False,
                     gradient_as_bucket_view=True)
    m.resolution = resolution
    if cached:
        m.vae_scale = dataset.index["vae_scale"]  # s in z = s·(μ + σ·n), from the VAE that made the cache
    pred_type = m.scheduler.config.prediction_type
    if pred_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"error: unsupported scheduler prediction_type {pred_type!r}")
    embedder = M.load_embedder(args.embed_model, device) if args.loss == "rpo" and not cached else None

    def all_skips():
        """skip_counts plus every rank's new_skips (a collective under DDP: all ranks call it)."""
        every = [new_skips]
        if ddp:
            every = [None] * world
            dist.all_gather_object(every, new_skips)
        total = dict(skip_counts)
        for counts in every:
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def data_stream(epoch, item):
        """Batches of item indices in a per-epoch permutation seeded by (seed, epoch). A global
        micro-batch is global_batch consecutive items of it, and rank r takes items
        [r·B, (r+1)·B) of each: the ranks' union is what one process with --batch_size B·W takes.
        The position is (epoch, items consumed in the epoch), whatever the world size, so resuming
        at it replays exactly the items an uninterrupted run would see, on any number of ranks.
        pickapic:DIR deals whole row groups to ranks instead (dataset.epoch_batches): the same
        position resumes exactly on the same number of ranks, and approximately on another.
        pickapic:HUB_ID is read in stream order; `item` then counts rows read, over all ranks."""
        if streamed:
            rows, kept, skipped = item // world, [], []
            for new_epoch, it in dataset.stream(epoch, rank, world, rows):
                rows = 1 if new_epoch != epoch else rows + 1
                epoch = new_epoch
                if "skip" in it:
                    skipped.append(it["skip"])
                    continue
                kept.append(it)
                if len(kept) == args.batch_size:
                    batch = data.collate_pairs(kept)
                    batch["skipped"] = skipped
                    yield epoch, rows * world, batch
                    kept, skipped = [], []
        while True:
            dataset.epoch = epoch
            if hasattr(dataset, "epoch_batches"):
                batches = dataset.epoch_batches(epoch, rank, world, args.batch_size)[item // global_batch:]
            else:
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).tolist()
                starts = range(item, len(order) - global_batch + 1, global_batch)
                batches = [order[s + rank * args.batch_size:s + (rank + 1) * args.batch_size] for s in starts]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                 collate_fn=data.collate_pairs, num_workers=args.num_workers)
            for batch in loader:
                item += global_batch
                yield epoch, item, batch
            epoch, item = epoch + 1, 0

    # -----------------------------------------------------------------------------------
    # The loss of one micro-batch.
    autocast = torch.autocast(device_type=m.device.type, dtype=m.dtype, enabled=args.mixed_precision != "no")

    def micro_batch_loss(batch, generator, counts):
        """counts: every rank's number of pairs in this micro-batch ([B] for one process). This
        rank's pairs are pairs [offset, offset + B) of the global micro-batch; each random draw
        below is made for the whole global micro-batch and sliced, so every rank gets exactly
        the numbers one process would draw for these pairs, and the shared generator stays in
        step on all ranks (one t per batch is then the same t everywhere)."""
        prompts, B = batch["prompt"], len(batch["prompt"])
        offset, total = sum(counts[:rank]), sum(counts)
        drop = torch.zeros(B, dtype=torch.bool)
        if args.caption_dropout > 0:  # classifier-free guidance needs ε_θ(z_t, t, "") too
            drop = torch.rand(total, generator=generator)[offset:offset + B] < args.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        pairs = args.loss != "sft"
        mine = torch.arange(offset, offset + B)
        rows = (torch.cat([mine, total + mine]) if pairs else mine) if ddp else None
        if cached:
            latents, cond, features = cached_inputs(m, batch, dataset.empty, generator, drop, rows,
                                                    (2 if pairs else 1) * total, pairs)
        else:
            images = torch.cat([batch["winner"], batch["loser"]]) if pairs else batch["winner"]
            with torch.no_grad():
                # SPEC §1: z = s·VAE.encode(x) (the images themselves for pixel-space presets). Under
                # DDP the VAE's sample is drawn for the global [winners; losers] and our rows kept.
                latents = encode_latents(m, images, generator, rows, (2 if pairs else 1) * total)
                sizes = torch.cat([batch["original_size_w"], batch["original_size_l"]]) if pairs else batch["original_size_w"]
                crops = batch["crop_top_left"].repeat(2 if pairs else 1, 1)
                cond = M.encode_prompts(m, prompts, sizes, crops, repeat=2 if pairs else 1)
        weights, gather = None, None
        if args.loss == "rpo":
            # E5 for [winners; losers] in one pass (each prompt's text encoded once)
            if cached:
                emb_w, emb_l = data.combine_features(*features, args.embed).chunk(2)
            else:
                emb_w, emb_l = data.clip_embeddings(*embedder, prompts, images, args.embed).chunk(2)
            if ddp and args.global_contrast:
                # E5 embeddings of the global batch, so that ω (E6) is the global (B·W)² matrix.
                # gather: the per-pair errors inside diffusion_loss, with autograd (gather_rows).
                gather = functools.partial(gather_rows, counts=counts)
                emb_w, emb_l = gather(torch.stack([emb_w, emb_l], dim=1)).unbind(1)
            weights = L.rpo_weights(emb_w, emb_l, args.tau)  # E6
        return diffusion_loss(m, latents, cond, generator, args.loss, args.timesteps, args.beta, weights,
                              args.rpo_weighting, autocast, policy=policy, rows=(offset, total), gather=gather)

    # -----------------------------------------------------------------------------------
    # Optimizer, and where to start.
    # The optimizer holds the trainable parameters as the ranks see them: DDP's replicas (the
    # same tensors as m.unet's), or FSDP's shards (DTensors: AdamW's moments are then sharded too).
    params = [p for p in m.unet.parameters() if p.requires_grad]  # LoRA: the adapter's A and B only
    optimizer = make_optimizer(args.optimizer, params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                               args.weight_decay)
    scaler = torch.amp.GradScaler(m.device.type, enabled=args.mixed_precision == "fp16")
    step, epoch, items_in_epoch = 0, 0, 0
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        # Every rank reads the checkpoint (on multi-node runs OUT_DIR must be a shared file system).
        # It holds the full weights and optimizer state in the single-device format whatever
        # wrote it, so it resumes on any number of ranks, with or without --fsdp.
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
        # FSDP: rank 0 reads the full tensors into host memory and fsdp_load_state hands every
        # rank its shard (a full fp32 SDXL state on the GPU next to the shards would not fit 24 GB).
        where = "cpu" if args.fsdp else str(m.device)
        reads = master or not args.fsdp
        optimizer_state = optimizer_state_from_tensors(
            load_file(os.path.join(ckpt, "optimizer.safetensors"), device=where), state["optimizer"]) if reads else {}
        if m.lora:  # the adapter only: the frozen base is rebuilt identically by load_models
            M.load_lora(m, os.path.join(ckpt, "lora"))
        elif args.fsdp:
            weights = load_unet_weights(os.path.join(ckpt, "unet"), where) if master else {}
            fsdp_load_state(m.unet, optimizer, weights, optimizer_state)
        else:
            m.unet.load_state_dict(load_unet_weights(os.path.join(ckpt, "unet"), where))
        if not args.fsdp:
            optimizer.load_state_dict(optimizer_state)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = load_file(os.path.join(ckpt, "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        # Position in the data: items consumed in the epoch, which any world size can continue
        # from (checkpoints before data parallelism counted batches of --batch_size).
        step, epoch = state["step"], state["epoch"]
        items_in_epoch = state.get("items_in_epoch", state.get("batch_in_epoch", 0) * state["args"]["batch_size"])
        skip_counts = state.get("skip_counts", skip_counts)
        log(f"resumed from {ckpt} at step {step}" + (f" (written by {state.get('world_size', 1)} "
                                                     f"process(es), continued by {world})" if ddp else ""))

    def checkpoint(path, keep=None):
        # Every rank calls this: FSDP gathers the shards (collectives), skips are summed; rank 0 writes.
        state = dict(step=step, epoch=epoch, items_in_epoch=items_in_epoch, world_size=world, skip_counts=all_skips(),
                     args=vars(args), rng="timesteps/noise: Generator(seed, step, micro-batch), drawn for the "
                                          "global micro-batch; crops: (seed, epoch, index)")
        unet, optim = fsdp_full_state(m.unet, optimizer, master) if args.fsdp else (m.unet, optimizer)
        if master:
            save_checkpoint(path, m, optim, scaler, state, keep, unet=unet)

    what = f"{M.unet_size(m.unet) / 1e6:.1f}M-parameter UNet"
    if m.lora:
        what += f", LoRA rank {args.lora_rank}: {sum(p.numel() for p in params) / 1e6:.3f}M trainable"
    on = (f"{world} ranks ({'FSDP' if args.fsdp else 'DDP'}, {dist.get_backend()}, {m.device.type}), "
          f"{args.batch_size}×{args.grad_accum}×{world}") if ddp else f"{m.device}, {args.batch_size}×{args.grad_accum}"
    log(f"training {args.loss} on {args.model} ({what}) on {on} pairs/step, data {args.data} "
        + ("(streamed)" if streamed else f"({len(dataset)} items)"))

    # -----------------------------------------------------------------------------------
    # The loop.
    stream = data_stream(epoch, items_in_epoch)
    metrics_file = None
    if master:
        # One line per step, never two: a resumed run replays the steps after its checkpoint, so
        # their old lines go; a fresh run (no --resume) starts a fresh log.
        metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
        kept = []
        if args.resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
        metrics_file = open(metrics_path, "a")
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
            for reason in batch["skipped"]:  # found while reading: corrupt images (hub: ties, ... too)
                kind = reason.split(":")[0]  # "corrupt image: PATH" -> "corrupt image"
                new_skips[kind] = new_skips.get(kind, 0) + 1
            if streamed and ddp:  # ranks' stream epochs can differ by a batch: log the latest one
                e = torch.tensor([epoch], device=m.device)
                dist.all_reduce(e, op=dist.ReduceOp.MAX)
                epoch = int(e.item())
            n = len(batch["prompt"])
            counts = world_counts(n, m.device) if ddp else [n]
            if min(counts) == 0:  # (on every rank alike: a rank with no pairs cannot join DDP's backward)
                continue
            generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1009 + micro)
            # DDP: all-reduce gradients only in the last micro-batch's backward; before it, each rank
            # accumulates its own (no_sync), which the last all-reduce then averages in one go. FSDP
            # reduce-scatters every micro-batch instead: skipping that (set_requires_gradient_sync)
            # would hold full unsharded gradients, the memory FSDP is there to save.
            accumulate = ddp and not args.fsdp and micro < args.grad_accum - 1
            with policy.no_sync() if accumulate else contextlib.nullcontext():
                loss, metrics = micro_batch_loss(batch, generator, counts)
                finite = bool(torch.isfinite(loss)) if not ddp else all_ranks(torch.isfinite(loss).item(), m.device)
                if finite or ddp:  # DDP/FSDP: every forward needs its backward (the reducer waits for it)
                    scaler.scale(loss / args.grad_accum).backward()
            synced = not accumulate
            if not finite:
                break
            for k, v in dict(metrics, loss=loss.item()).items():
                sums[k] = sums.get(k, 0.0) + v
            n_pairs += n
            n_micro += 1
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
                checkpoint(os.path.join(args.out_dir, f"checkpoint-{step:06d}"))
                raise SystemExit(f"error: {bad_steps} bad steps in a row at step {step} (NaN/inf loss or no data); "
                                 f"weights before them saved in {args.out_dir}/checkpoint-{step:06d}; try a lower --lr")
            continue
        if not synced:  # DDP and the last micro-batch was skipped: its all-reduce never ran
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        bad_steps = 0
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        # FSDP: the norm of sharded gradients is a DTensor; full_tensor() is the global norm.
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if ddp:  # the log's figures as global means: every rank's sums, summed (one all_reduce a step)
            keys = list(sums)  # the same order on every rank: the same code ran
            v = torch.tensor([sums[k] for k in keys] + [n_pairs], dtype=torch.float64, device=m.device)
            dist.all_reduce(v)
            sums, n_pairs = {k: x / world for k, x in zip(keys, v.tolist())}, int(v[-1].item())
        record = {k: v / n_micro for k, v in sums.items()}
        record.update(step=step, lr=lr, grad_norm=grad_norm, pairs_per_s=n_pairs / (time.time() - t0), epoch=epoch)
        if epoch_done:  # skip counts in the metrics too: at each epoch's end and at the last step
            record["skipped"] = skips
        if step == args.max_steps:
            record["skipped"] = all_skips()
        if master:
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
    final = os.path.join(args.out_dir, f"checkpoint-{step:06d}")
    checkpoint(final, keep=args.keep_checkpoints)
    folder = "lora" if m.lora else "unet"
    unet_dir, tmp = os.path.join(args.out_dir, folder), os.path.join(args.out_dir, folder + ".tmp")
    if master:
        metrics_file.close()
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
    skips = all_skips()
    if skips:
        log(f"skipped (counted): {skips}")
    log(f"done: {step} steps; {'LoRA' if m.lora else 'UNet'} in {unet_dir}")
    if ddp:
        # Free DDP's reducer while the process group is still registered: the reducer holds the
        # group from C++ and, were it the last holder, would destroy it with the GIL held, while
        # a gloo worker thread may still need the GIL to drop a finished collective's tensors
        # (seen: a hang at exit). destroy_process_group frees the group with the GIL released.
        policy = None
        dist.barrier()  # no rank leaves before rank 0 has written the result
        if own_group:
            dist.destroy_process_group()
    return m


if __name__ == "__main__":
    main()
