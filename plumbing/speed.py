"""
Speed levers for a built UNet, each measured by bench/speed.py (--compile, --gradient_checkpointing,
--channels_last, --sdpa_backend) and adopted by train.py with one call; one_thread, for the
tiny CPU models; device_defaults, which resolves train.py's "auto" flags, --num_workers among
them (auto_workers), and input_note, the start line about the input path on a GPU. Nothing
here changes what a forward pass computes.
"""
import argparse
import contextlib
import platform
import os

import torch


# Speed levers for a built UNet: bench/speed.py measures each one (--compile, --checkpointing,
# --channels_last, --sdpa_backend), and train.py can adopt any of them with one call.
CHECKPOINTING = ("none", "all", "transformer", "alternate", "resnet", "hires")  # and transformer:F, 0 < F <= 1

def checkpointing_ok(which):
    """Whether `which` names a checkpointing choice: CHECKPOINTING, or transformer:F, 0 < F <= 1."""
    if which in CHECKPOINTING:
        return True
    try:
        return which.startswith("transformer:") and 0 < float(which.split(":", 1)[1]) <= 1
    except ValueError:
        return False

def apply_checkpointing(unet, which="all"):
    """Gradient checkpointing of a chosen set of blocks (recomputed in backward instead of
    keeping their activations), in place; state_dict and forward results unchanged.
      none           nothing
      all            diffusers' own: every ResnetBlock2D and every BasicTransformerBlock
      transformer    every BasicTransformerBlock, no ResNets: in SDXL the transformer blocks hold
                     most of the activations and of the forward FLOPs (the measured shares are in
                     docs/speed-gpu.md)
      transformer:F  the fraction F of the transformer blocks, the widest-activation ones first
                     (lowest channel count = highest resolution: they hold the most activation
                     bytes per FLOP recomputed), spread evenly within a width; transformer:0.5 =
                     half the saving, half the recompute
      alternate      every other BasicTransformerBlock, in module order
      resnet         every ResnetBlock2D only
      hires          every ResNet and the transformer blocks of the highest-resolution level
    diffusers asks each down/mid/up block and each Transformer2DModel to checkpoint its children
    through module._gradient_checkpointing_func(child, *args); here that function checkpoints
    the chosen children and calls the others directly. Non-reentrant torch.utils.checkpoint, as
    diffusers' default: it composes with compile_blocks (the compiled block is recomputed) and
    with DDP/FSDP."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    fraction = None
    if which.startswith("transformer:"):
        try:
            fraction = float(which.split(":", 1)[1])
        except ValueError:
            fraction = -1
        if not 0 < fraction <= 1:
            raise SystemExit(f"error: --checkpointing {which!r}: transformer:F needs 0 < F <= 1")
    elif which not in CHECKPOINTING:
        raise SystemExit(f"error: --checkpointing {which!r}: choose from {', '.join(CHECKPOINTING)} or transformer:F")
    if which == "none":
        unet.disable_gradient_checkpointing()
        return set()
    blocks = [mod for mod in unet.modules() if isinstance(mod, BasicTransformerBlock)]
    resnets = [mod for mod in unet.modules() if isinstance(mod, ResnetBlock2D)]
    if which == "all":  # diffusers' own function: what --gradient_checkpointing always did
        unet.enable_gradient_checkpointing()
        return blocks + resnets
    if fraction is not None:
        chosen, want = [], round(fraction * len(blocks))
        for width in sorted({blk.norm1.normalized_shape[0] for blk in blocks}):
            group = [blk for blk in blocks if blk.norm1.normalized_shape[0] == width]
            k = min(len(group), want - len(chosen))
            chosen += [group[(2 * i + 1) * len(group) // (2 * k)] for i in range(k)]  # k evenly spaced
    elif which == "transformer":
        chosen = blocks
    elif which == "alternate":
        chosen = blocks[::2]
    elif which == "resnet":
        chosen = resnets
    else:  # hires: transformer blocks of the first (highest-resolution) down block that has attentions
        first = next(b for b in unet.down_blocks if getattr(b, "attentions", None))
        chosen = resnets + [mod for mod in first.modules() if isinstance(mod, BasicTransformerBlock)]
        up = next(b for b in reversed(unet.up_blocks) if getattr(b, "attentions", None))
        chosen += [mod for mod in up.modules() if isinstance(mod, BasicTransformerBlock)]
    ids = {id(mod) for mod in chosen}

    def checkpoint_some(module, *args):
        if id(module) in ids:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    unet.enable_gradient_checkpointing(checkpoint_some)
    return chosen

def compile_blocks(unet, **kwargs):
    """Regional compilation: torch.compile every BasicTransformerBlock and ResnetBlock2D in
    place (Module.compile: state_dict keys, save_pretrained and resume unchanged) instead of the
    whole UNet. Blocks of the same shape share one compiled graph, so SDXL compiles a few dozen
    small graphs (per shape: training forward/backward, and the reference's no-grad forward)
    instead of one huge one; what stays eager (convs in/out, up/down samplers, the
    Transformer2DModel's norm and projections) is a small share of the FLOPs. dynamic=False: every
    shape gets its own static graph (the default would switch to dynamic-shape kernels at the
    second shape), so Dynamo's per-function recompile limit is raised to fit them all."""
    import torch._dynamo
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 512))
    kwargs.setdefault("dynamic", False)
    n = 0
    for mod in unet.modules():
        if isinstance(mod, (BasicTransformerBlock, ResnetBlock2D)):
            mod.compile(**kwargs)
            n += 1
    return n

def compile_unet(unet, mode="regional"):
    """--compile: "full" compiles the whole UNet (train.py's --compile until now), "regional"
    its blocks (compile_blocks), "none" nothing. unet may be None (no reference UNet)."""
    if unet is None:
        return
    if mode == "full":
        unet.compile()
    elif mode == "regional":
        compile_blocks(unet)
    elif mode not in ("none", None):
        raise SystemExit(f"error: --compile {mode!r}: choose none, regional or full")

SDPA_BACKENDS = ("default", "flash", "cudnn", "efficient", "math")

_SDP_DEFAULT_ORDER = torch._C._get_sdp_priority_order() if hasattr(torch._C, "_get_sdp_priority_order") else None

def set_sdpa_backend(name="default", fallback=True):
    """Which kernel F.scaled_dot_product_attention (diffusers' AttnProcessor2_0) uses, process
    wide; call before the first forward (a compiled graph keeps the kernel it was traced with).
      default    PyTorch's own choice (FlashAttention-2 for SDXL's bf16 head-dim-64 attention)
      cudnn      cuDNN's fused attention (Hopper kernels): faster SDXL steps than the default
                 on an H200 (figures in docs/speed-gpu.md)
      flash / efficient / math   that kernel
    fallback=True (for training): the named kernel first, the others after it for shapes it
    cannot take (SD1.5's head dim 160 exceeds cuDNN's 128); on a PyTorch without the
    priority-order switch, the named kernel plus the math one. fallback=False (bench/speed.py): the
    named kernel alone, so an unsupported shape fails instead of timing another kernel."""
    from torch.nn.attention import SDPBackend
    if name not in SDPA_BACKENDS:
        raise SystemExit(f"error: --sdpa_backend {name!r}: choose from {', '.join(SDPA_BACKENDS)}")
    b = torch.backends.cuda
    every = name == "default" or (fallback and _SDP_DEFAULT_ORDER is not None)
    b.enable_flash_sdp(every or name == "flash")
    b.enable_cudnn_sdp(every or name == "cudnn")
    b.enable_mem_efficient_sdp(every or name == "efficient")
    b.enable_math_sdp(every or fallback or name == "math")
    if _SDP_DEFAULT_ORDER is not None:
        order = list(_SDP_DEFAULT_ORDER)
        if name != "default":
            first = int({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])
            order = [first] + [x for x in order if x != first]
        torch._C._set_sdp_priority_order(order)

def to_channels_last(*unets):
    """NHWC memory format for the convolutions of each UNet given (None entries skipped)."""
    for unet in unets:
        if unet is not None:
            unet.to(memory_format=torch.channels_last)

@contextlib.contextmanager
def one_thread():
    # For tiny models (the toy scorer, the toy CLIP): a second intra-op thread buys little, on a
    # busy machine it is much slower than one, and one thread is bit-for-bit reproducible.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# train.py's set-up from its flags
def device_defaults(args, device, real):
    """Resolve train.py's "auto" flags (real: an sd15/sdxl preset, not a tiny one). GPU defaults are what bench/speed.py measured fastest (docs/speed.md,
    docs/speed-gpu.md): bf16 autocast with fp32 master weights, the reference in bf16, fused
    AdamW, cuDNN attention, TF32 matmuls, regional compilation, selective checkpointing."""
    gpu = device.startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if gpu else "no"
    if args.optimizer == "auto":
        args.optimizer = "adamw_fused" if gpu else "adamw"
    if args.sdpa_backend == "auto":
        args.sdpa_backend = "cudnn" if gpu else "default"
    # Regional compilation and checkpointing of the widest quarter of the transformer blocks:
    # the fastest configuration that fits SDXL's full fine-tune (1024², 4 pairs) in 80 GB, run
    # on an H200 alone and under DDP, FSDP and LoRA (docs/speed-gpu.md). On a CPU, inductor's
    # compile time outweighs what it saves on the tiny presets.
    if args.compile == "auto":
        args.compile = "regional" if gpu else "none"
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "transformer:0.25" if gpu and real and not args.lora_rank else "none"
    # The input path off the critical path: on a GPU, images are decoded and cropped in DataLoader
    # workers while the GPU runs the previous step; on the CPU they share the cores with the
    # step, so the main process reads them, as it always did.
    if args.num_workers == "auto":
        args.num_workers = auto_workers() if gpu else 0
    if gpu:
        set_sdpa_backend(args.sdpa_backend)  # with the others as fallbacks for shapes it cannot take


# The input path
MAX_AUTO_WORKERS = 4


def workers_flag(text):
    """train.py's --num_workers: "auto" or a count >= 0."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be auto or 0 or more, not {text}")
    return n


def auto_workers():
    """--num_workers auto on a GPU: this process's share of the CPU cores it may run on (under
    torchrun, LOCAL_WORLD_SIZE processes share them), less one for the process itself, at most
    MAX_AUTO_WORKERS. 0 when no core is left over: a worker would then only take turns with the
    process that drives the GPU."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        cores = os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def input_note(args, device, dataset):
    """One line for train.py's start on a GPU about the input path, or None (always None on the
    CPU, and for toy data, rendered at the training size). Raw images are decoded, resized and
    cropped on the CPU, then go through the VAE, the text encoders and E5's CLIP on the GPU every
    step; a cache (python -m tools.build_cache) does none of that. The line says "likely to hold
    the GPU back" when the decoding runs on the main process (--num_workers 0, or images streamed
    from the hub) or Pillow lacks libjpeg-turbo."""
    if not str(device).startswith("cuda") or str(args.data).startswith("toy"):
        return None
    profile = "python -m bench.speed profile [train.py flags] times each part of a step"
    if str(args.data).startswith("cache:"):
        if args.num_workers:
            return None
        return f"input path: cache shards are read on the main process (--num_workers 0) ({profile})"
    slow = []
    if hasattr(dataset, "stream"):  # the hub: this process reads and decodes, never a DataLoader worker
        slow.append("images streamed from the hub are decoded on the main process (--num_workers does not apply; "
                    "hf:DIR, the downloaded shards, decodes in workers)")
    elif args.num_workers == 0:
        slow.append("images are decoded and cropped on the main process (--num_workers 0) while the GPU waits "
                    "(--num_workers auto decodes in workers)")
    from PIL import features
    if not features.check_feature("libjpeg_turbo"):
        slow.append("this Pillow decodes JPEG without libjpeg-turbo")
    cache = "a cache (python -m tools.build_cache, then --data cache:DIR) skips decoding and the encoders"
    if slow:
        return f"input path: likely to hold the GPU back: {'; '.join(slow)}; {cache} ({profile})"
    return (f"input path: {args.num_workers} DataLoader workers decode and crop ahead of the GPU; the VAE, text "
            f"encoders and CLIP run every step; {cache} ({profile})")


def machine():
    """What makes floating point differ between machines: the CPU model and the torch build. Runs
    repeat bit for bit on one machine; a record (tools/same_runs.py, the toy study's results) names it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}
