"""
Load or build the diffusion stack: the trainable policy UNet ε_θ, the frozen reference
UNet ε_ref, the frozen VAE and text encoder(s), the noise scheduler, and the CLIP model
that embeds samples for the RPO weights (E5).

LoRA (lora_rank > 0, needs peft): the policy is the frozen starting UNet plus low-rank
adapters on its attention projections, and the reference ε_ref is the *same* UNet with the
adapters switched off (reference_unet below), so no second UNet is held in memory. Adapters
are saved and loaded in the diffusers LoRA format (save_lora / load_lora), which the stock
StableDiffusion(XL)Pipeline.load_lora_weights(dir) reads.

Presets
  sd15     Stable Diffusion 1.5, hub id stable-diffusion-v1-5/stable-diffusion-v1-5
  sdxl     SDXL base 1.0,        hub id stabilityai/stable-diffusion-xl-base-1.0
           (both: --pretrained PATH_OR_ID points at another id or a local diffusers folder)
  tiny     built in code, no download: the SD1.5 path (one CLIP text encoder, a
           UNet2DConditionModel, DDPM noise) in *pixel space* at 16x16 — no VAE, the
           "latents" are the images in [-1, 1]. Small enough to pretrain on a CPU in minutes,
           which a random VAE would make impossible (its latents would mean nothing).
  tiny-xl  built in code: the whole SDXL path — two text encoders (penultimate hidden
           states concatenated, pooled embedding of the second), add_time_ids from each
           image's original size and crop corner, and a tiny random AutoencoderKL — at 32x32
           pixels / 16x16x4 latents. Random weights: it exercises code, it learns nothing.
  tiny-sd  the SD1.5 path *with* that tiny VAE (32x32 pixels, 16x16x4 latents): what the
           stock StableDiffusionPipeline tests load. Random weights too.
The tiny components are built from a fixed seed, so every process that builds them gets the
same frozen text encoder; only the UNet is ever trained and saved.
"""
import contextlib
import copy
import json
import os
import re
import sys
import warnings
from types import SimpleNamespace

import torch
from diffusers.utils import logging as diffusers_logging

import loss as L
from toy import BACKGROUNDS, COLOURS, SHAPES

diffusers_logging.set_verbosity_error()  # silences a dtype-cast notice on every .to()

PRESETS = {
    # multiple: image sizes must divide by it (VAE factor × the UNet's down-sampling)
    "sd15": dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", xl=False, resolution=512, multiple=64),
    "sdxl": dict(pretrained="stabilityai/stable-diffusion-xl-base-1.0", xl=True, resolution=1024, multiple=32),
    "tiny": dict(pretrained=None, xl=False, resolution=16, vae=False, multiple=2),
    "tiny-sd": dict(pretrained=None, xl=False, resolution=32, vae=True, multiple=4),
    "tiny-xl": dict(pretrained=None, xl=True, resolution=32, vae=True, multiple=4),
}


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
# The real presets' UNet architectures (their unet/config.json, non-default fields), so that
# bench/speed.py can build them with random weights and no download. Text-encoder outputs they
# expect: sd15 hidden states (B, 77, 768); sdxl (B, 77, 2048) plus pooled (B, 1280) and 6 time ids.
ARCHITECTURES = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
TEXT_SHAPES = {"sd15": dict(tokens=77, hidden=768), "sdxl": dict(tokens=77, hidden=2048, pooled=1280)}
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_SEED = 0  # the tiny presets' frozen parts must be identical in every process
# LoRA's default targets: the four projections of every attention layer, self- and cross-
# (diffusers' own SD/SDXL LoRA scripts use the same four). Names are module-name suffixes.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(dir) looks for


# ---------------------------------------------------------------------------------------
# Tiny components, built in code
def tiny_tokenizer(max_length=16):
    """A real CLIPTokenizer (byte-level BPE) with a small vocabulary: every byte, plus
    whole-word tokens for the toy set's words (toy/__init__.py), so toy prompts are ~10 tokens and
    any other text still tokenizes, character by character."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = ["<|startoftext|>", "<|endoftext|>"] + byte_chars + [c + "</w>" for c in byte_chars]
    merges, seen = [], set(vocab)
    words = ["a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS]
    for word in words:  # a chain of merges (b,a) (ba,c) ... spells each word as one token
        pieces = list(word)
        pieces[-1] += "</w>"
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            if cur not in seen:
                vocab.append(cur)
                seen.add(cur)
    ids = {v: i for i, v in enumerate(vocab)}
    try:
        return CLIPTokenizer(vocab=ids, merges=merges, model_max_length=max_length)  # transformers >= 5
    except TypeError:  # transformers 4.x builds it from files only
        import tempfile
        folder = tempfile.mkdtemp(prefix="tiny-tokenizer-")
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(ids, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             model_max_length=max_length)


def _tiny_text_config(vocab_size, max_length, hidden=32):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                          projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_unet_config(xl, vae):
    # ~1M parameters. Pixel space (3 channels) for tiny, 4 latent channels with a VAE.
    config = dict(sample_size=16, in_channels=4 if vae else 3, out_channels=4 if vae else 3,
                  block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8)
    if xl:  # SDXL's micro-conditioning: pooled text embedding + 6 time ids (SDXL paper, §2.2)
        config.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def build_tiny(xl, vae):
    """Every component of a tiny preset, with fixed-seed random weights (no download)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = tiny_tokenizer()
        text_config = _tiny_text_config(len(tokenizer), tokenizer.model_max_length)
        parts = dict(unet=UNet2DConditionModel(**tiny_unet_config(xl, vae)),
                     tokenizers=[tokenizer], text_encoders=[CLIPTextModel(text_config)], vae=None)
        if xl:
            parts["tokenizers"].append(tiny_tokenizer())
            parts["text_encoders"].append(CLIPTextModelWithProjection(text_config))
        if vae:
            parts["vae"] = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                                         down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    # SD's noise schedule for every tiny preset, pixel space included. DDPM's linear one
    # (ᾱ_T = 4e-5) was tried first for pixels: DDIM's x0 estimate divides by sqrt(ᾱ_t) ≈ 0.01
    # at the first steps, so a small model's ε errors were amplified 100x and samples diverged.
    # Spacing and offset are set explicitly, as the real SD/SDXL configs do: left unset, each
    # sampling scheduler built with from_config would pick its own default.
    parts["scheduler"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, timestep_spacing="leading", steps_offset=1)
    return parts


# ---------------------------------------------------------------------------------------
# Real components, from the hub or a local diffusers folder
def _offline_exit(what, source, err):
    # One clear line instead of a traceback: the usual cause is a machine without hub access.
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    raise SystemExit(f"error: cannot load the {what} from '{source}' ({reason}). Without hub access, download "
                     f"the model once and pass --pretrained /path/to/folder (a diffusers layout with unet/, vae/, "
                     f"text_encoder/, tokenizer/, scheduler/).")


def load_real(source, xl, encoders=True):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    kw = dict(local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    try:
        parts = dict(scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
                     unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
                     vae=None, text_encoders=[], tokenizers=[])
        if not encoders:
            return parts
        parts.update(tokenizers=[CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)],
                     text_encoders=[CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)],
                     vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw))
        if xl:
            parts["tokenizers"].append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw))
            parts["text_encoders"].append(
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw))
    except (OSError, ValueError, EnvironmentError) as err:
        _offline_exit("model", source, err)
    return parts


# What a UNet must share with a preset's to take its place (latents, text states, SDXL's extras).
UNET_FIT = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim")


def fitting_unet(unet, preset_unet, what, model):
    """unet, after checking it can take preset_unet's place: a UNet of another preset would fail
    deep inside the first step, or worse, run."""
    for key in UNET_FIT:
        want, got = preset_unet.config.get(key), unet.config.get(key)
        if want != got:
            raise SystemExit(f"error: {what} does not fit --model {model}: its {key} is {got}, the preset's {want}; "
                             f"pass the --model it was trained with")
    return unet


def first_line(err):
    """An exception's first line, at most 200 characters: what a one-line error quotes."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def safetensors_problem(path):
    """Why a .safetensors file cannot be whole (missing, cut short, not safetensors), or None.
    The byte ranges its header declares must end exactly at the end of the file."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"is truncated or corrupt ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is corrupt (its header is not a safetensors header)"
    if 8 + n + end != size:
        return f"is truncated or corrupt ({size} bytes where its header promises {8 + n + end})"
    return None


# owner/name: what --init or --unet may mean when no such path exists
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@contextlib.contextmanager
def quiet():
    # Library deprecation notices on stderr would bury the one line a failure ends in.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_unet(spec, flag="--init"):
    """The UNet of `flag` (train.py's --init, sample.py's --unet): a local unet/ folder (or its
    parent), or, when no such path exists, a hub id owner/name. Any problem ends in one line
    naming the flag."""
    from diffusers import UNet2DConditionModel
    if not os.path.exists(spec):
        if not HUB_ID.fullmatch(spec):
            raise SystemExit(f"error: {flag} {spec}: no such folder (nor a hub id of the form owner/name)")
        return _hub_unet(spec, flag)
    path = os.path.join(spec, "unet") if os.path.isdir(os.path.join(spec, "unet")) else spec
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {flag} {spec}: no UNet there (expected a diffusers unet/ folder with config.json)")
    for name in sorted(os.listdir(path)):  # diffusers' own message for a cut file names no cause
        problem = safetensors_problem(os.path.join(path, name)) if name.endswith(".safetensors") else None
        if problem:
            raise SystemExit(f"error: {flag} {spec}: {os.path.join(path, name)} {problem}; copy or save it again")
    try:
        with quiet():
            return UNet2DConditionModel.from_pretrained(path)
    except Exception as err:  # a bad config.json, a .bin that is not a checkpoint, ...
        raise SystemExit(f"error: {flag} {spec}: cannot load the UNet in {path} "
                         f"({type(err).__name__}: {first_line(err)})")


def _hub_unet(repo, flag):
    """A hub repo's UNet: its unet/ subfolder (a pipeline repo such as mhdang/dpo-sd1.5-text2image-v1)
    or its root (a UNet-only repo), whichever holds config.json."""
    from diffusers import UNet2DConditionModel
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError:  # huggingface_hub < 1.0
        from huggingface_hub.errors import EntryNotFoundError as RemoteEntryNotFoundError
    # (the variable as the hub library reads it, but now: it reads it once, at its import)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    reason = None
    for sub in ("unet", None):
        try:
            with quiet():
                hf_hub_download(repo, "config.json", subfolder=sub, local_files_only=offline)
        except RemoteEntryNotFoundError as err:  # the hub answered: not in this repo, try its root
            if not isinstance(err, LocalEntryNotFoundError):  # (< 1.0 derives the offline miss from it)
                continue
            if offline:
                reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
                continue
            reason = first_line(err)
            break
        except (OSError, ValueError) as err:  # offline and not cached, no network, no such repo
            if offline:  # the hub's own message would only say "check your connection"
                reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
                continue  # the cache may hold the root layout
            reason = first_line(err)
            break  # the other layout would only wait for the network again
        try:
            with quiet():
                return UNet2DConditionModel.from_pretrained(repo, subfolder=sub, local_files_only=offline)
        except Exception as err:  # weights that fail to download or load
            reason = first_line(err)
            break
    if reason is None:
        raise SystemExit(f"error: {flag} {repo}: the hub repo has no unet/config.json nor config.json (not a "
                         f"diffusers UNet)")
    raise SystemExit(f"error: {flag} {repo}: not a local folder, and it could not be downloaded from the Hugging "
                     f"Face hub ({reason}); download it where there is network (hf download {repo}) "
                     f"and pass its folder")


# ---------------------------------------------------------------------------------------
# The one loader that train.py, sample.py and evaluate.py use
def load_models(model="tiny", pretrained=None, init_unet=None, device="cpu", mixed_precision="no",
                gradient_checkpointing=False, reference=True, random_unet=False, lora_rank=0, lora_alpha=None,
                lora_targets=LORA_TARGETS, lora_dir=None, encoders=True):
    """Returns a namespace with
      unet       the policy ε_θ: fp32 master weights, train mode, requires grad
      ref_unet   the reference ε_ref: a frozen copy of the *starting* UNet in the compute dtype,
                 eval mode (None if reference=False, e.g. for SFT or sampling; None with LoRA)
      lora       True when the policy is the UNet plus trainable LoRA adapters (lora_rank > 0)
      vae        frozen, or None for pixel space; text_encoders / tokenizers: frozen, lists
                 (two for SDXL); scheduler: DDPMScheduler, the forward process q(z_t|z_0)
      xl, resolution, dtype (compute dtype), device, vae_scale (s in z = s·VAE.encode(x))
    random_unet=True (bench/speed.py): a real preset's UNet built from ARCHITECTURES with random
    weights, no VAE and no text encoders (the caller feeds latents and text states directly).
    lora_rank R > 0: the UNet's own weights are frozen and kept in the compute dtype, and a
    peft LoRA adapter of rank R (scale lora_alpha / R, alpha default R) on the modules named
    lora_targets is the only trainable part, in fp32. The reference is that UNet with the
    adapter disabled: use `with reference_unet(m) as ref:` rather than m.ref_unet.
    lora_dir: a saved LoRA (a folder with pytorch_lora_weights.safetensors, e.g. train.py's
    OUT_DIR/lora) merged into the starting UNet's weights, e.g. for sample.py.
    encoders=False: no VAE and no text encoders (vae None, empty lists): training from data.py's
    cache of latents and text states needs only the UNets and the scheduler.
    """
    if model not in PRESETS:
        raise SystemExit(f"error: unknown --model {model!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[model]
    dtype = DTYPES[mixed_precision]
    if mixed_precision == "fp16" and str(device) == "cpu":
        raise SystemExit("error: --mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    if preset["pretrained"] is None:
        if pretrained:
            raise SystemExit(f"error: --model {model} is built in code; --pretrained is for sd15/sdxl")
        parts = build_tiny(preset["xl"], preset["vae"])
        if not encoders:
            parts.update(vae=None, text_encoders=[], tokenizers=[])
    elif random_unet:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        with torch.device(device):  # initialise on the GPU directly: 2.6B random weights take minutes on a CPU
            unet = UNet2DConditionModel(**ARCHITECTURES[model])
        parts = dict(unet=unet, vae=None, text_encoders=[], tokenizers=[],
                     scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012, clip_sample=False))
    else:
        parts = load_real(pretrained or preset["pretrained"], preset["xl"], encoders)
    if init_unet:  # start from a saved UNet (e.g. a pretrained toy base): policy and reference
        parts["unet"] = fitting_unet(load_unet(init_unet), parts["unet"], f"--init {init_unet}", model)
    if lora_dir:  # a saved LoRA merged into the weights: from here on it *is* the starting UNet
        fuse_lora(parts["unet"], lora_dir)

    unet = parts["unet"].to(device).float().train()
    try:  # PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels)
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor(AttnProcessor2_0())
    except ImportError:
        pass
    ref_unet, lora_layers = None, []
    if lora_rank > 0:
        # LoRA: policy = frozen UNet + adapter, reference = the same UNet, adapter off (docs/method.md:
        # ε_ref is the frozen starting UNet, which is exactly what the adapter-free path computes).
        LoraConfig = _import_peft("--lora_rank").LoraConfig
        unet.requires_grad_(False)  # (peft's injection also marks only adapters trainable; explicit here)
        # init "gaussian": A ~ N(0, 1/R), B = 0, so B·A = 0 and the policy starts *equal* to the
        # reference (every logit 0, loss ln 2, as in full fine-tuning). Drawn from the global
        # torch RNG, which train.py seeds before building the models: reproducible per seed.
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                            target_modules=list(lora_targets))
        try:  # diffusers' PeftAdapterMixin.add_adapter: peft's inject_adapter_in_model, adapter "default"
            unet.add_adapter(config)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
            raise SystemExit(f"error: --lora_targets {','.join(lora_targets)}: {str(err).splitlines()[0][:200]}")
        # The adapter was created (and initialised) in fp32, like the UNet at this point, and is
        # the only thing with requires_grad; the frozen base now drops to the compute dtype: this
        # is LoRA's memory win (a bf16 UNet instead of an fp32 policy + a bf16 reference copy).
        # Under autocast the policy then runs the same bf16 matmuls as the full fine-tune's
        # fp32-master-weight policy does; peft casts each LoRA input to the adapter's dtype.
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        from peft.tuners.tuners_utils import BaseTunerLayer
        lora_layers = [mod for mod in unet.modules() if isinstance(mod, BaseTunerLayer)]
    elif reference:
        # The reference is the frozen starting point of the policy (docs/method.md, Setting). Kept on the same
        # device in the compute dtype: no CPU offload, half the memory of an fp32 copy.
        ref_unet = copy.deepcopy(unet).to(dtype).eval().requires_grad_(False)
    if gradient_checkpointing:  # diffusers checkpoints non-reentrantly: fine with a frozen base
        unet.enable_gradient_checkpointing()
    frozen = lambda m: None if m is None else m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = parts["vae"]
    if vae is not None:  # fp16 VAEs overflow (SDXL's notoriously); keep fp32 unless bf16
        vae = vae.to(device=device, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        vae.eval().requires_grad_(False)
    return SimpleNamespace(
        name=model, xl=preset["xl"], resolution=preset["resolution"], unet=unet, ref_unet=ref_unet, vae=vae,
        lora=lora_rank > 0, lora_layers=lora_layers,
        text_encoders=[frozen(te) for te in parts["text_encoders"]], tokenizers=parts["tokenizers"],
        scheduler=parts["scheduler"], dtype=dtype, device=torch.device(device),
        vae_scale=vae.config.scaling_factor if vae is not None else 1.0)


# ---------------------------------------------------------------------------------------
# LoRA: the reference as the adapter-free UNet; saving and loading the diffusers LoRA format
def make_optimizer(name, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """train.py's --optimizer: adamw, adamw_fused, adafactor or adamw8bit (bitsandbytes)."""
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


def _import_peft(flag):
    # peft is optional: only LoRA needs it, so it is imported here and not at the top.
    try:
        import peft
    except ImportError:
        raise SystemExit(f"error: {flag} needs peft (pip install peft)")
    return peft


@contextlib.contextmanager
def reference_unet(m):
    """`with reference_unet(m) as ref:` gives the UNet that computes ε_ref (E1, reference):
    m.ref_unet for full fine-tuning; for LoRA m.unet itself with its adapters disabled for the
    duration of the block (the base weights are frozen, so that is the starting UNet).

    Safe between a policy forward and its backward: the adapter weights enter the policy's
    graph as leaves, and the graph only keeps references to them, so running the base UNet in
    between changes nothing that backward reads. One catch: peft's enable_adapters(False)
    also sets requires_grad=False on the adapter weights, and autograd's AccumulateGrad then
    silently *drops* their gradients (checked: all grads None). enable_adapters(True) sets
    requires_grad back on the active adapter, so the adapters are re-enabled in `finally`,
    before any backward can run (tests/test_lora.py compares the gradients)."""
    if not getattr(m, "lora", False):
        yield m.ref_unet
        return
    # peft's per-layer switch, on the layers found once at load (UNet.disable_adapters() does the
    # same but walks every module of the UNet each call: thousands for SDXL, twice a micro-batch).
    for layer in m.lora_layers:
        layer.enable_adapters(False)
    try:
        yield m.unet
    finally:
        for layer in m.lora_layers:
            layer.enable_adapters(True)


def save_lora(m, directory):
    """The adapter of m.unet -> DIRECTORY/pytorch_lora_weights.safetensors in the diffusers LoRA
    format: keys "unet.<module>.lora.down.weight" / ".lora.up.weight" (peft's lora_A / lora_B),
    exactly what StableDiffusion(XL)Pipeline.save_lora_weights writes and load_lora_weights
    reads. The LoraConfig goes into the safetensors header as diffusers' adapter metadata:
    without it a loader infers alpha = rank from the shapes, which is wrong for any
    lora_alpha != lora_rank (the output would be scaled by rank/alpha)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    pipeline = StableDiffusionXLPipeline if m.xl else StableDiffusionPipeline  # same layout either way
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet))
    pipeline.save_lora_weights(directory, unet_lora_layers={k: v.contiguous() for k, v in layers.items()},
                               unet_lora_adapter_metadata=m.unet.peft_config["default"].to_dict(),
                               weight_name=LORA_FILE, safe_serialization=True)


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
    _import_peft("a LoRA (lora_dir)")
    if not os.path.isfile(os.path.join(directory, LORA_FILE)):
        raise SystemExit(f"error: no LoRA at '{directory}' (expected {LORA_FILE})")
    unet.load_lora_adapter(directory, prefix="unet", weight_name=LORA_FILE, adapter_name="loaded")
    unet.fuse_lora()
    unet.unload_lora()


# ---------------------------------------------------------------------------------------
# Conditioning, latents, and the noise prediction
@torch.no_grad()
def encode_prompts(m, prompts, original_sizes=None, crop_top_left=None, repeat=1):
    """Text conditioning for a list of prompts -> dict for predict_noise.

    SD1.5: the text encoder's last hidden state. SDXL: the penultimate hidden states of both
    encoders concatenated, the second encoder's pooled (projected) embedding, and
    add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.
    repeat=2 gives the batch [winners; losers] for one list of prompts: the text is encoded
    once, and original_sizes / crop_top_left (LongTensors (repeat·B, 2); default: the training
    resolution and (0, 0)) give each image its own time ids.
    """
    hidden, pooled = encode_text(m, prompts)
    return text_conditioning(m, hidden, pooled, original_sizes, crop_top_left, repeat)


def encode_text(m, prompts):
    """The text encoders' outputs for prompts: hidden states (B, L, D) and, for SDXL, the pooled
    embedding (B, P) (else None). What data.py's cache stores per prompt."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(m.tokenizers, m.text_encoders):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(m.device)
        out = encoder(ids, output_hidden_states=m.xl)
        hidden.append(out.hidden_states[-2] if m.xl else out[0])
        if m.xl:
            pooled = out[0]  # CLIPTextModelWithProjection's text_embeds (the 2nd encoder's)
    return torch.cat(hidden, dim=-1), pooled


def text_conditioning(m, hidden, pooled=None, original_sizes=None, crop_top_left=None, repeat=1):
    """encode_text's outputs (computed now or read from a cache) -> predict_noise's cond."""
    cond = {"encoder_hidden_states": hidden.to(m.device).repeat(repeat, 1, 1)}
    if m.xl:
        B, R = repeat * len(hidden), m.resolution
        pooled = pooled.to(m.device).repeat(repeat, 1)
        if original_sizes is None:
            original_sizes = torch.tensor([[R, R]] * B)
        if crop_top_left is None:
            crop_top_left = torch.zeros(B, 2, dtype=torch.long)
        target = torch.tensor([[R, R]] * B)
        time_ids = torch.cat([original_sizes, crop_top_left, target], dim=1).to(m.device, m.dtype)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return cond


@torch.no_grad()
def encode_images(m, images, generator=None):
    """Images in [-1, 1] (B,3,H,W) -> latents z = s · VAE.encode(x) (docs/method.md, Setting), fp32.
    Pixel-space presets: z = x."""
    if m.vae is None:
        return images.to(m.device, torch.float32)
    dist = m.vae.encode(images.to(m.device, m.vae.dtype)).latent_dist
    return (dist.sample(generator=generator) * m.vae_scale).float()


@torch.no_grad()
def decode_latents(m, latents):
    if m.vae is None:
        return latents.float().clamp(-1, 1)
    return m.vae.decode(latents.to(m.vae.dtype) / m.vae_scale).sample.float().clamp(-1, 1)


def predict_noise(unet, noisy_latents, t, cond):
    """ε_θ(z_t, t, c) (or v, for a v-prediction scheduler): the one call that training (policy
    and reference) and sampling share. Inputs are cast to the UNet's dtype; under autocast the
    fp32 policy still runs its matmuls in the compute dtype. `unet` may be train.py's DDP wrapper
    of the UNet (the UNet is its .module)."""
    dtype = getattr(unet, "module", unet).dtype
    added = cond.get("added_cond_kwargs")
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    return unet(noisy_latents.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                added_cond_kwargs=added, return_dict=False)[0]


# ---------------------------------------------------------------------------------------
# The CLIP model behind the RPO weights (E5)
def tiny_clip():
    """The tiny CLIP (text: tiny_tokenizer + 2 layers of 32; vision: 16x16 pixels, 4x4 patches,
    2 layers of 32; joint space of 32) with fixed-seed random weights -> (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        tokenizer = tiny_tokenizer()
        config = CLIPConfig(
            text_config=_tiny_text_config(len(tokenizer), tokenizer.model_max_length).to_dict(),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4, projection_dim=32),
            projection_dim=32)
        return CLIPModel(config), tokenizer


def default_embed_model(model_name):
    """E5's CLIP when --embed_model is not given. Tiny presets: "toy-clip", the tiny CLIP trained
    on the toy world (toy/clip.py; ~40 s once on a CPU, then cached), so that ω (E6) sees each
    pair's content and style; RPO_DIFFUSION_TOY_E5=tiny picks the random tiny CLIP instead (the
    test suite's: no training, and no figure that depends on one). sd15/sdxl: CLIP ViT-L/14."""
    if PRESETS[model_name]["pretrained"] is None:
        return os.environ.get("RPO_DIFFUSION_TOY_E5") or "toy-clip"
    return "openai/clip-vit-large-patch14"


def load_embedder(name="tiny", device="cpu"):
    """CLIP in the joint text-image space, for f(c, x) (E5). `name`: a hub id or local folder
    (default for real presets: openai/clip-vit-large-patch14), or "tiny" for a built-in
    random CLIP that keeps the tiny presets offline. Returns (model, tokenizer). (For "toy-clip",
    the tiny CLIP trained on the toy world, ask toy_clip.embedder.)"""
    from transformers import CLIPModel, CLIPTokenizer
    if name == "tiny":
        model, tokenizer = tiny_clip()
    else:
        kw = dict(local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        try:
            model, tokenizer = CLIPModel.from_pretrained(name, **kw), CLIPTokenizer.from_pretrained(name, **kw)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot load the CLIP embedder '{name}' ({str(err).splitlines()[0][:160]}). "
                             f"Download it once and pass --embed_model /path/to/folder, or use --loss dpo.")
    return model.to(device).eval().requires_grad_(False), tokenizer


# ---------------------------------------------------------------------------------------
# E5's CLIP passes (the combination itself is loss.combine_features)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out):
    # transformers < 5 returns the projected features; 5.x wraps them in .pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


def clip_pixels(clip, images):
    """(N,3,H,W) images in [-1, 1] -> CLIP's pixel_values: resized to its input size (bicubic,
    batched, no PIL) and normalised as OpenAI CLIP's processor does, on the model's device."""
    device = next(clip.parameters()).device
    size = clip.config.vision_config.image_size
    x = (images.to(device, torch.float32) + 1) / 2
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(clip.dtype)


@torch.no_grad()
def clip_features(clip, tokenizer, prompts, images):
    """The two halves of E5 before they are combined: L2-normalised CLIP text features of the
    prompts (B, D) (None if prompts is None) and image features of `images` (N, D) (None if
    images is None). Images are (N,3,H,W) in [-1, 1], resized to CLIP's input size on the
    model's device (batched, no PIL)."""
    device = next(clip.parameters()).device
    text = image = None
    if prompts is not None:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        text = torch.nn.functional.normalize(_features(clip.get_text_features(input_ids=ids)).float(), dim=-1)
    if images is not None:
        pixels = clip_pixels(clip, images)
        image = torch.nn.functional.normalize(_features(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
    return text, image



@torch.no_grad()
def clip_embeddings(clip, tokenizer, prompts, images, mode="mean"):
    """f(c, x) for each sample, L2-normalised, float32 (k·B, D) (E5; loss.combine_features).
    `images` may hold k images per prompt, in k blocks ([winners; losers]: k = 2): the text is
    encoded once and repeated, as model.encode_prompts does."""
    text, image = clip_features(clip, tokenizer, None if mode == "image" else prompts,
                                None if mode == "text" else images)
    return L.combine_features(text, image, mode, rows=len(images))



@torch.no_grad()
def cached_inputs(m, batch, drop, sizes, crops, generator, share, rows, pairs=True):
    """--data cache:DIR: what the VAE, the text encoders and E5's CLIP would compute, from the
    cache's tensors (plumbing/cache.py). The VAE posterior's sample z = s·(μ + σ·n) is drawn as from the
    raw images (n for all `rows` of the global batch, this process's kept), so a cached batch
    gives the raw batch's latents. drop: the caption-dropout mask, which swaps in m.empty, the
    cached empty prompt's states. Returns latents, cond and E5's halves (text (B, D), image)."""
    cat = lambda key: torch.cat([batch[key + "_w"], batch[key + "_l"]]) if pairs else batch[key + "_w"]
    z = cat("cache_latent").float()
    if "cache_latent_std_w" in batch:
        n = torch.randn((rows, *z.shape[1:]), generator=generator, dtype=torch.float32)
        z = z + cat("cache_latent_std").float() * share.keep(n, pairs)
    latents = (z * m.vae_scale).to(m.device)

    def pick(key):  # the prompt's cached tensor, or the empty prompt's where the caption was dropped
        x = batch[key]
        return torch.where(drop.view(-1, *[1] * (x.dim() - 1)), m.empty[key.removeprefix("cache_")].to(x.dtype), x)

    hidden = pick("cache_text_hidden").to(m.dtype)
    pooled = pick("cache_text_pooled").to(m.dtype) if "cache_text_pooled" in batch else None
    cond = text_conditioning(m, hidden, pooled, sizes, crops, repeat=2 if pairs else 1)
    return latents, cond, (pick("cache_clip_text").float().to(m.device), cat("cache_clip_image").float().to(m.device))


# ---------------------------------------------------------------------------------------
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
      transformer    every BasicTransformerBlock, no ResNets. SDXL at 1024²: the transformer
                     blocks hold ~88% of the activations (6.5 of 7.4 GiB a sample, by saved-tensor
                     bytes) and 75% of the forward FLOPs; the ResNets 10% and 20%
      transformer:F  the fraction F of the transformer blocks, the widest-activation ones first
                     (lowest channel count = highest resolution: SDXL's 640-channel blocks at 64²
                     latents hold 2.2 GiB per forward TFLOP, the 1280-channel ones 1.1), spread
                     evenly within a width; transformer:0.5 = half the saving, half the recompute
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
      cudnn      cuDNN's fused attention (Hopper kernels): 3.4% faster SDXL steps than the
                 default in eager on an H200 (docs/speed-gpu.md)
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


# ---------------------------------------------------------------------------------------
# The real presets' frozen parts with random weights (bench/speed.py --pretrained random): the
# shapes of their config.json files, so that VAE, text encoders and CLIP cost what the real
# ones cost, with no download. The tokenizer is tiny_tokenizer at 77 tokens (the text encoders
# see the same (B, 77) ids shape; the ids only index the random 49408-row embedding).
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
REAL_TEXT = {"clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu"),
             "bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          projection_dim=1280, hidden_act="gelu")}
REAL_CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _real_text_config(kind):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **REAL_TEXT[kind])


def build_random_real(model, device="cpu", encoders=True):
    """What load_real returns for sd15/sdxl, built from the architectures with random weights
    on `device` (initialising 1-3B parameters on a CPU takes minutes; on a GPU, seconds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    xl = PRESETS[model]["xl"]
    with torch.device(device):
        parts = dict(unet=UNet2DConditionModel(**ARCHITECTURES[model]), vae=None, text_encoders=[], tokenizers=[],
                     scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012, clip_sample=False))
        if encoders:
            parts["vae"] = AutoencoderKL(**REAL_VAE, sample_size=PRESETS[model]["resolution"],
                                         scaling_factor=0.13025 if xl else 0.18215)
            parts["tokenizers"] = [tiny_tokenizer(77)]
            parts["text_encoders"] = [CLIPTextModel(_real_text_config("clip-l"))]
            if xl:
                parts["tokenizers"].append(tiny_tokenizer(77))
                parts["text_encoders"].append(CLIPTextModelWithProjection(_real_text_config("bigg")))
    return parts


def random_embedder(device="cpu"):
    """load_embedder's (model, tokenizer) with CLIP ViT-L/14's shapes (openai/clip-vit-large-patch14,
    train.py's default E5 model) and random weights."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(text_config=_real_text_config("clip-l").to_dict(), vision_config=REAL_CLIP_VISION,
                        projection_dim=768)
    with torch.device(device):
        model = CLIPModel(config)
    return model.eval().requires_grad_(False), tiny_tokenizer(77)


# ---------------------------------------------------------------------------------------
# train.py's set-up from its flags
def device_defaults(args, device):
    """Resolve the "auto" flags. GPU defaults are what bench/speed.py measured fastest (docs/speed.md,
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
        real = PRESETS[args.model]["pretrained"] is not None
        args.gradient_checkpointing = "transformer:0.25" if gpu and real and not args.lora_rank else "none"
    if gpu:
        set_sdpa_backend(args.sdpa_backend)  # with the others as fallbacks for shapes it cannot take


def from_args(args, device, dataset, resolution):
    """-> (m, policy). m: policy ε_θ (trainable), reference ε_ref (frozen), VAE, text
    encoders (model.load_models); with --lora_rank the policy is the frozen UNet + adapter and
    the reference that UNet with the adapter off (m.ref_unet is None). A cache holds what the
    encoders compute, so they are not loaded for one. policy: what the training forward calls
    (m.unet, or its DDP/FSDP wrapper)."""
    cached = args.data.startswith("cache:")
    m = load_models(args.model, args.pretrained, args.init, device, args.mixed_precision,
                    args.gradient_checkpointing == "all", reference=args.loss != "sft", lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")), encoders=not cached)
    if args.gradient_checkpointing not in ("none", "all"):  # ("all": load_models' own)
        apply_checkpointing(m.unet, args.gradient_checkpointing)
    for unet in (m.unet, m.ref_unet):  # in place: state_dict keys, save_pretrained and resume stay as they are
        compile_unet(unet, args.compile)
    m.resolution = resolution
    if cached:
        m.vae_scale, m.empty = dataset.index["vae_scale"], dataset.empty  # s of the VAE that made the cache
    if m.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"error: unsupported scheduler prediction_type {m.scheduler.config.prediction_type!r}")
    from plumbing import distributed  # (only train.py's set-up wraps the policy)
    return m, distributed.wrap_policy(m.unet, args.fsdp, device)


@contextlib.contextmanager
def one_thread():
    # For tiny models (the toy scorer, the toy CLIP): a second intra-op thread buys little, on a
    # busy machine 2 threads measured 20x SLOWER than 1, and one thread is bit-for-bit reproducible.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def unet_size(unet):
    return sum(p.numel() for p in unet.parameters())


if __name__ == "__main__":  # python model.py tiny: build a preset and print its parts
    m = load_models(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    print(json.dumps({"preset": m.name, "unet_params": unet_size(m.unet), "xl": m.xl, "resolution": m.resolution,
                      "vae": m.vae is not None, "text_encoders": len(m.text_encoders)}))
