"""
LoRA adapters on disk, in the diffusers format: save_lora writes what
StableDiffusion(XL)Pipeline.load_lora_weights reads, load_lora reads it back bit for bit (resume),
fuse_lora merges one into a plain UNet (sampling), check_lora tells a bad folder in one line.
The adapter itself is made in model.load_models; the reference as the adapter-free UNet is
model.reference_unet.
"""
import os

from plumbing import hub


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(dir) looks for

def import_peft(flag):
    # peft is optional: only LoRA needs it, so it is imported here and not at the top.
    try:
        import peft
    except ImportError:
        raise SystemExit(f"error: {flag} needs peft (pip install peft)")
    return peft

def add_adapter(unet, rank, alpha, targets, dtype):
    """A trainable LoRA adapter of rank R (scale alpha/R, alpha default R) on the modules named
    `targets`, in fp32, with everything else frozen in the compute dtype -> the adapter layers,
    for model.reference_unet's switch (model.load_models calls it)."""
    LoraConfig = import_peft("--lora_rank").LoraConfig
    unet.requires_grad_(False)  # (peft's injection also marks only adapters trainable; explicit here)
    # init "gaussian": A ~ N(0, 1/R), B = 0, so B·A = 0 and the policy starts *equal* to the
    # reference (every logit 0, loss ln 2, as in full fine-tuning). Drawn from the global
    # torch RNG, which train.py seeds before building the models: reproducible per seed.
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    try:  # diffusers' PeftAdapterMixin.add_adapter: peft's inject_adapter_in_model, adapter "default"
        unet.add_adapter(config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise SystemExit(f"error: --lora_targets {','.join(targets)}: {hub.first_line(err)}")
    # The adapter was created (and initialised) in fp32, like the UNet at this point, and is
    # the only thing with requires_grad; the frozen base now drops to the compute dtype: this
    # is LoRA's memory win (a bf16 UNet instead of an fp32 policy + a bf16 reference copy).
    # Under autocast the policy then runs the same bf16 matmuls as the full fine-tune's
    # fp32-master-weight policy does; peft casts each LoRA input to the adapter's dtype.
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [mod for mod in unet.modules() if isinstance(mod, BaseTunerLayer)]


def save_lora(m, directory):
    """The adapter of m.unet -> DIRECTORY/pytorch_lora_weights.safetensors in the diffusers LoRA
    format: keys "unet.<module>.lora.down.weight" / ".lora.up.weight" (peft's lora_A / lora_B),
    exactly what StableDiffusion(XL)Pipeline.save_lora_weights writes and load_lora_weights
    reads. The LoraConfig goes into the safetensors header as diffusers' adapter metadata:
    without it a loader infers alpha = rank from the shapes, which is wrong for any
    lora_alpha != lora_rank (the output would be scaled by rank/alpha). Only the fields every peft
    release knows (metadata_of): a whole LoraConfig dict of a newer peft does not load in an older one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    pipeline = StableDiffusionXLPipeline if m.xl else StableDiffusionPipeline  # same layout either way
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet))
    pipeline.save_lora_weights(directory, unet_lora_layers={k: v.contiguous() for k, v in layers.items()},
                               unet_lora_adapter_metadata=metadata_of(m.unet.peft_config["default"]),
                               weight_name=LORA_FILE, safe_serialization=True)

def metadata_of(config):
    """The LoraConfig fields that define the adapter (rank, alpha, the modules), in a form any peft
    release since 0.17 reads back with LoraConfig(**metadata)."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "init_lora_weights": config.init_lora_weights}


def load_lora(m, directory):
    """Weights saved by save_lora -> the adapter of m.unet, in place and bit for bit (train.py
    --resume). The inverse of save_lora's renaming; every adapter tensor must be in the file."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    saved = load_file(os.path.join(directory, LORA_FILE), device=str(m.device))
    saved = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in saved.items()})
    expected = get_peft_model_state_dict(m.unet)
    if saved.keys() != expected.keys() or any(saved[k].shape != v.shape for k, v in expected.items()):
        raise SystemExit(f"error: the LoRA in '{directory}' does not match this adapter (--lora_rank/--lora_targets)")
    set_peft_model_state_dict(m.unet, saved, adapter_name="default")

def fuse_lora(unet, directory):
    """Merge a saved LoRA into a plain UNet's weights, W += (alpha/R)·B·A, and drop the adapter:
    what remains is an ordinary UNet2DConditionModel (sampling at full speed, savable with
    save_pretrained). Uses diffusers' own loader, so the adapter metadata (alpha) is honoured
    exactly as load_lora_weights would."""
    import_peft("a LoRA (lora_dir)")
    if not os.path.isfile(os.path.join(directory, LORA_FILE)):
        raise SystemExit(f"error: no LoRA at '{directory}' (expected {LORA_FILE})")
    unet.load_lora_adapter(directory, prefix="unet", weight_name=LORA_FILE, adapter_name="loaded")
    unet.fuse_lora()
    unet.unload_lora()


# The LoRA matrices of a weight W: down/A is (r, in, ...), sharing W's dim 1; up/B (out, r, ...) dim 0.
LORA_SUFFIXES = {".lora.down.weight": 1, ".lora_A.weight": 1, ".lora.up.weight": 0, ".lora_B.weight": 0}

def check_lora(directory, unet=None):
    """--lora: train.py's OUT_DIR/lora (diffusers LoRA format). Without `unet`: the file is there
    and whole. With it: every tensor adapts a layer of that UNet with matching shapes. Checked by
    hand because a loader that skips what it cannot place would sample another model silently."""
    from safetensors import safe_open
    path = os.path.join(directory, LORA_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"error: --lora {directory}: no {LORA_FILE} there (expected train.py --lora_rank's "
                         f"OUT_DIR/lora)")
    problem = hub.safetensors_problem(path)
    if problem:
        raise SystemExit(f"error: --lora {directory}: {path} {problem}")
    if unet is None:
        return
    with safe_open(path, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    modules, bad = dict(unet.named_modules()), []
    for key, shape in shapes.items():
        suffix = next((x for x in LORA_SUFFIXES if key.endswith(x)), None)
        layer = modules.get(key.removeprefix("unet.")[:-len(suffix)]) if key.startswith("unet.") and suffix else None
        weight = getattr(layer, "weight", None)
        i = LORA_SUFFIXES.get(suffix)
        if weight is None or len(shape) != weight.dim() or shape[i] != weight.shape[i]:
            bad.append(key)
    if bad or not shapes:
        raise SystemExit(f"error: --lora {directory}: {len(bad)} of {len(shapes)} tensors fit no layer of this UNet "
                         f"(e.g. {bad[0] if bad else 'none: the file is empty'}); was it trained on another "
                         f"--model or --unet?")
