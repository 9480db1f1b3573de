"""
Data parallelism set up: one process per device under torchrun (setup, teardown), the policy
replicated with DDP or, with --fsdp, its weights, gradients and AdamW state sharded with FSDP2
(wrap_policy, shard_unet), and the full single-device state gathered for checkpoints and scattered
back on resume, so that a checkpoint written with FSDP resumes without it and the other way round
(docs/multi-gpu.md). Also the device rules every program shares (pick_device, device_exists), the
set-up's check that every rank reads the same data (same_data) and what says another rank is gone
(peer_lost). The collectives of a training step are distributed.py's.
"""
import os
import re
import sys

import torch
import torch.distributed as dist

from plumbing.distributed import active


def pick_device(flag):
    """--device: "auto" is the GPU where one is visible, else the CPU; any other value as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag


def device_exists(name):
    """Whether torch can place tensors on `name` here (cpu, cuda, cuda:N, mps, ...)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


def setup(device_flag):
    """-> (rank, world, device, own_group). One device per rank: cuda:LOCAL_RANK with NCCL, or
    the CPU with gloo (no GPU, or --device cpu). own_group: this call made the process group (a
    caller, e.g. a test, may have made it already), so teardown() should end it."""
    if int(os.environ.get("RANK", "-1")) == -1:
        return 0, 1, pick_device(device_flag), False
    gpu = torch.cuda.is_available() and device_flag != "cpu"
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    rank = dist.get_rank()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if gpu else "cpu"  # --device cuda[:N]: "the GPUs"
    if gpu:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device, own_group

def teardown(own_group):
    # Every rank waits until rank 0 has written the result. The caller drops its DDP wrapper
    # first: DDP's reducer holds the group from C++ and, were it the last holder, would destroy
    # it with the GIL held while a gloo thread may still need the GIL (seen: a hang at exit).
    if active():
        dist.barrier()
        if own_group:
            dist.destroy_process_group()

def wrap_policy(unet, fsdp, device):
    """The module the training forward calls; the UNet itself stays m.unet (the reference
    forward, LoRA's adapter switch and saving use it).
      DDP: a replica per rank; gradients averaged after backward (all-reduce in buckets,
        overlapping the backward), only for requires_grad parameters (a LoRA all-reduces its
        adapters only). gradient_as_bucket_view: no second copy of the gradients (SDXL: 10 GB).
      FSDP (--fsdp): shard_unet shards the UNet in place; the reference stays a full frozen copy."""
    if fsdp:
        return shard_unet(unet)
    if not active():
        return unet
    from torch.nn.parallel import DistributedDataParallel as DDP
    gpu = str(device).startswith("cuda")
    return DDP(unet, device_ids=[torch.device(device).index] if gpu else None, find_unused_parameters=False,
               gradient_as_bucket_view=True)


def shard_unet(unet):
    """--fsdp: FSDP2 (fully_shard) on every ResNet and transformer block, then every down/mid/up
    block, then the root. Each parameter lives in its innermost group, as 1/W of a flat fp32
    shard per rank; a group's full weights are all-gathered just before its forward (and again
    for its backward) and freed after, and its gradients reduce-scattered as soon as they exist:
    small groups keep the transient small (docs/multi-gpu.md). Params stay fp32 and autocast
    does the bf16 compute, as without FSDP, so the numbers match DDP's."""
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
    those weights (save_pretrained then writes what a single-device run writes) and the optimizer
    state in the single-device format (parameters numbered, not named); (None, None) elsewhere."""
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
    """--fsdp resume: full weights and a single-device optimizer state dict -> every rank's
    shards. Rank 0 alone reads the checkpoint and passes it here; the other ranks pass {} and
    receive the tensors from it one by one (broadcast_from_rank0), each keeping its slice: one
    full copy in host memory per node, not one per rank (SDXL's weights and AdamW state: 31 GB)."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_model_state_dict(unet, weights, options=options)
    if optim_state:
        names = trainable_names(unet)
        optim_state = {"state": {names[i]: v for i, v in optim_state["state"].items()},
                       "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                        for g in optim_state["param_groups"]]}
    dcp.set_optimizer_state_dict(unet, optimizer, optim_state, options=options)


def same_data(dataset, spec):
    """The data set's index-level skip counts, once every rank has been found to hold the same data
    (its size, what its index skipped; all_gather_object: a collective). Ranks that read different
    copies (a node whose copy lacks a file) would deal different epochs, and their collectives would
    wait for each other forever: one line instead, from rank 0, and every rank stops."""
    skips = dict(getattr(dataset, "skip_counts", {}))
    if not active():
        return skips
    mine = (None if hasattr(dataset, "stream") else len(dataset), sorted(skips.items()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if any(seen != every[0] for seen in every):
        if dist.get_rank() == 0:
            shown = "; ".join(f"rank {r}: {n} pairs" + (f", skipped {dict(s)}" if s else "")
                              for r, (n, s) in enumerate(every))
            print(f"error: the ranks read different data from --data {spec} ({shown}); every rank must read the same "
                  f"files (on several nodes: the same copy at the same path)", file=sys.stderr, flush=True)
        dist.barrier()  # (rank 0 has said it before any rank ends: torchrun stops the others when one does)
        raise SystemExit(1)
    return skips


def peer_lost(err):
    """Whether `err`, raised under torchrun, says that another rank is gone (it ended, was killed,
    or stopped answering) while this one waited for it in a collective: c10d's own errors (NCCL,
    timeouts, the store) or gloo's broken connection. -> the error in a few words, or None."""
    text = str(err)
    if not (active() and (isinstance(err, dist.DistError) or ("gloo" in text and "by peer" in text))):
        return None
    words = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [type(err).__name__])[0])
    return words.split(". This is typically")[0][:200]
