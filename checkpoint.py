"""
Checkpoints and outputs of train.py: safetensors and JSON only, never pickle.

    OUT_DIR/checkpoint-000200/   unet/ (diffusers layout) or lora/ (diffusers LoRA format),
                                 optimizer.safetensors, rng.safetensors, state.json
    OUT_DIR/unet/ or lora/       the final weights, for sample.py and the stock pipelines
    OUT_DIR/metrics.jsonl        one line per optimizer step

Every checkpoint is written into PATH.tmp and renamed, so a crash never leaves a half-written
one that --resume would pick. A checkpoint holds full, single-device state whatever wrote it
(FSDP's shards are gathered first: distributed.fsdp_full_state), so it resumes on any number
of ranks, with or without --fsdp.
"""
import glob
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import distributed as D
import model as M

# What must match for a run to continue a checkpoint: the reference is the same starting UNet,
# and the weights have the same shape.
RESUME_KEYS = ("model", "init", "loss", "lora_rank")
LORA_KEYS = ("lora_alpha", "lora_targets")


def optimizer_to_tensors(optimizer):
    """Tensors of the optimizer state for safetensors; plain numbers (Adafactor's step) for JSON.
    `optimizer`: an optimizer, or a state dict in its format (FSDP's, gathered)."""
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


def load_unet_weights(folder, device):
    """A saved unet/ folder's weights as one state dict. save_pretrained splits a UNet above
    10 GB into several diffusion_pytorch_model-0000N-of-0000M.safetensors (SDXL in fp32 is 10.3)."""
    weights = {}
    for f in sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors"))):
        weights.update(load_file(f, device=str(device)))
    return weights


def save_checkpoint(path, m, optimizer, scaler, state, keep=None, unet=None):
    """Write everything into PATH.tmp, then rename. `unet` (default m.unet) and `optimizer` (an
    optimizer or its state dict) may be the full copies gathered from FSDP's shards. keep: how
    many step checkpoints to keep in PATH's folder (the oldest go)."""
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


def save(path, args, m, optimizer, scaler, position, skip_counts, master, keep=None):
    """A checkpoint of the run at `position` (step, epoch, items_in_epoch). Every rank calls
    this (FSDP gathers its shards: collectives); rank 0 writes."""
    state = dict(position, world_size=dist.get_world_size() if D.active() else 1, skip_counts=skip_counts,
                 args=vars(args), rng="timesteps/noise: Generator(seed, step, micro-batch), drawn for the "
                                      "global micro-batch; crops: (seed, epoch, index)")
    unet, optim = D.fsdp_full_state(m.unet, optimizer, master) if args.fsdp else (m.unet, optimizer)
    if master:
        save_checkpoint(path, m, optim, scaler, state, keep, unet=unet)


def resume(args, m, optimizer, scaler, master):
    """Load --resume's checkpoint (OUT_DIR's latest, or the folder given) into the model, the
    optimizer and the scaler. Returns (checkpoint path, its state.json). Every rank reads it (on
    multi-node runs OUT_DIR must be a shared file system); with --fsdp rank 0 alone reads the
    full tensors into host memory and every rank receives its shard."""
    ckpt = latest_checkpoint(args.out_dir) if args.resume == "latest" else args.resume
    if ckpt is None or not os.path.isfile(os.path.join(ckpt, "state.json")):
        raise SystemExit(f"error: --resume found no checkpoint in '{ckpt or args.out_dir}'")
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    for key in RESUME_KEYS + (LORA_KEYS if args.lora_rank else ()):
        if state["args"].get(key) != getattr(args, key):
            raise SystemExit(f"error: checkpoint {ckpt} was trained with --{key} {state['args'].get(key)}, "
                             f"not {getattr(args, key)}")
    where = "cpu" if args.fsdp else str(m.device)
    reads = master or not args.fsdp
    optimizer_state = optimizer_state_from_tensors(
        load_file(os.path.join(ckpt, "optimizer.safetensors"), device=where), state["optimizer"]) if reads else {}
    if m.lora:  # the adapter only: the frozen base is rebuilt identically by load_models
        M.load_lora(m, os.path.join(ckpt, "lora"))
    elif args.fsdp:
        weights = load_unet_weights(os.path.join(ckpt, "unet"), where) if master else {}
        D.fsdp_load_state(m.unet, optimizer, weights, optimizer_state)
    else:
        m.unet.load_state_dict(load_unet_weights(os.path.join(ckpt, "unet"), where))
    if not args.fsdp:
        optimizer.load_state_dict(optimizer_state)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(load_file(os.path.join(ckpt, "rng.safetensors"))["torch_cpu"])
    return ckpt, state


def open_metrics(out_dir, step, resumed):
    """OUT_DIR/metrics.jsonl for appending, one line per step, never two: a resumed run replays
    the steps after its checkpoint, so their old lines go; a fresh run starts a fresh log."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if resumed and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def export(out_dir, final, folder):
    """OUT_DIR/unet (or lora) from the final checkpoint, hard-linked to save disk (copied where
    links fail), swapped in by a rename: a stock diffusers UNet folder / LoRA folder."""
    target, tmp = os.path.join(out_dir, folder), os.path.join(out_dir, folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(os.path.join(final, folder)):
        src = os.path.join(final, folder, name)
        try:
            os.link(src, os.path.join(tmp, name))
        except OSError:
            shutil.copy2(src, os.path.join(tmp, name))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target
