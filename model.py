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
import sys
from types import SimpleNamespace

import torch
from diffusers.utils import logging as diffusers_logging

import loss as L
from plumbing import hub, lora, parallel, random_weights, speed, tiny, toy_clip
from plumbing.images import clip_output, clip_pixels

diffusers_logging.set_verbosity_error()  # silences a dtype-cast notice on every .to()

PRESETS = {
    # multiple: image sizes must divide by it (VAE factor × the UNet's down-sampling)
    "sd15": dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", xl=False, resolution=512, multiple=64),
    "sdxl": dict(pretrained="stabilityai/stable-diffusion-xl-base-1.0", xl=True, resolution=1024, multiple=32),
    "tiny": dict(pretrained=None, xl=False, resolution=16, vae=False, multiple=2),
    "tiny-sd": dict(pretrained=None, xl=False, resolution=32, vae=True, multiple=4),
    "tiny-xl": dict(pretrained=None, xl=True, resolution=32, vae=True, multiple=4),
}


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# LoRA's default targets: the four projections of every attention layer, self- and cross-
# (diffusers' own SD/SDXL LoRA scripts use the same four). Names are module-name suffixes.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------
# The one loader that train.py, sample.py and evaluate.py use
def load_models(model="tiny", pretrained=None, init_unet=None, device="cpu", mixed_precision="no",
                gradient_checkpointing=False, reference=True, lora_rank=0, lora_alpha=None,
                lora_targets=LORA_TARGETS, lora_dir=None, encoders=True):
    """Returns a namespace with
      unet       the policy ε_θ: fp32 master weights, train mode, requires grad
      ref_unet   the reference ε_ref: a frozen copy of the *starting* UNet in the compute dtype,
                 eval mode (None if reference=False, e.g. for SFT or sampling; None with LoRA)
      lora       True when the policy is the UNet plus trainable LoRA adapters (lora_rank > 0)
      vae        frozen, or None for pixel space; text_encoders / tokenizers: frozen, lists
                 (two for SDXL); scheduler: DDPMScheduler, the forward process q(z_t|z_0)
      xl, resolution, dtype (compute dtype), device, vae_scale (s in z = s·VAE.encode(x))
    pretrained="random" (benchmarks): sd15/sdxl built from their architectures with random weights
    (plumbing/random_weights.py), no download: every code path at the real shapes (with
    encoders=False the UNet alone, as bench/speed.py feeds latents and text states directly).
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
        parts = tiny.build_tiny(preset["xl"], preset["vae"])
        if not encoders:
            parts.update(vae=None, text_encoders=[], tokenizers=[])
    elif pretrained == "random":  # benchmarks: the real shapes, random weights, no download
        parts = random_weights.build_random_real(preset["xl"], preset["resolution"], device, encoders)
    else:
        parts = hub.load_real(pretrained or preset["pretrained"], preset["xl"], encoders)
    if init_unet:  # start from a saved UNet (e.g. a pretrained toy base): policy and reference
        parts["unet"] = hub.fitting_unet(hub.load_unet(init_unet), parts["unet"], f"--init {init_unet}", model)
    if lora_dir:  # a saved LoRA merged into the weights: from here on it *is* the starting UNet
        lora.fuse_lora(parts["unet"], lora_dir)

    unet = parts["unet"].to(device).float().train()  # (attention: diffusers' default, PyTorch's fused SDPA)
    ref_unet, lora_layers = None, []
    if lora_rank > 0:
        # LoRA: policy = frozen UNet + adapter, reference = the same UNet, adapter off (docs/method.md:
        # ε_ref is the frozen starting UNet, which is exactly what the adapter-free path computes).
        lora_layers = lora.add_adapter(unet, lora_rank, lora_alpha, lora_targets, dtype)
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


# ---------------------------------------------------------------------------------------
# Conditioning, latents, and the noise prediction
@torch.no_grad()
def encode_prompts(m, prompts, original_sizes=None, crop_top_left=None, repeat=1, drop=None):
    """Text conditioning for a list of prompts -> dict for predict_noise.

    SD1.5: the text encoder's last hidden state. SDXL: the penultimate hidden states of both
    encoders concatenated, the second encoder's pooled (projected) embedding, and
    add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.
    repeat=2 gives the batch [winners; losers] for one list of prompts: the text is encoded
    once, and original_sizes / crop_top_left (LongTensors (repeat·B, 2); default: the training
    resolution and (0, 0)) give each image its own time ids.
    drop (bool per prompt, caption dropout): those rows get the unconditional input that
    sampling guides against (unconditional_text), so what training teaches is what guidance uses.
    """
    if drop is not None and not m.xl:
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    hidden, pooled = encode_text(m, prompts)
    if drop is not None and m.xl:
        hidden, pooled = unconditional_text(m, drop, hidden, pooled)
    return text_conditioning(m, hidden, pooled, original_sizes, crop_top_left, repeat)


def unconditional_text(m, drop, hidden, pooled=None, empty_hidden=None, empty_pooled=None):
    """The rows `drop` of the text states replaced by the unconditional input, the one rule for
    training (caption dropout) and sampling (sample.py) alike, as the stock pipelines define it:
    SD1.5 the encoding of "" (given here as empty_*: a cache's stored states); SDXL all zeros,
    hidden states and pooled embedding (its pipeline's force_zeros_for_empty_prompt)."""
    def swap(x, empty):
        if x is None:
            return None
        fill = torch.zeros_like(x) if m.xl else empty.to(x.device, x.dtype)
        return torch.where(drop.to(x.device).view(-1, *[1] * (x.dim() - 1)), fill, x)
    return swap(hidden, empty_hidden), swap(pooled, empty_pooled)


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
        # float32 whatever the compute dtype: bf16 would round a size such as 1366 to 1368 (the
        # UNet embeds time ids with sin/cos in float32 itself)
        time_ids = torch.cat([original_sizes, crop_top_left, target], dim=1).to(m.device, torch.float32)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return cond


@torch.no_grad()
def encode_images(m, images, generator=None, share=None, rows=None, pairs=True):
    """Images in [-1, 1] (B,3,H,W) -> latents z = s·(μ + σ·n), a sample of the VAE's posterior
    (docs/method.md, Setting), fp32. Pixel-space presets: z = x. n is diffusers' own draw from
    `generator`, or with `share` (training, train.model_inputs) drawn for all `rows` of the global
    micro-batch and this process's rows kept, as cached_inputs draws it."""
    if m.vae is None:
        return images.to(m.device, torch.float32)
    post = m.vae.encode(images.to(m.device, m.vae.dtype)).latent_dist
    if share is None:
        return (post.sample(generator=generator) * m.vae_scale).float()
    n = share.keep(torch.randn((rows, *post.mean.shape[1:]), generator=generator, dtype=post.mean.dtype), pairs)
    return ((post.mean + post.std * n.to(m.device)) * m.vae_scale).float()


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
    if added is not None:  # (SDXL's time ids stay float32: exact sizes)
        added = {"text_embeds": added["text_embeds"].to(dtype), "time_ids": added["time_ids"]}
    return unet(noisy_latents.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                added_cond_kwargs=added, return_dict=False)[0]


# ---------------------------------------------------------------------------------------
# The CLIP model behind the RPO weights (E5)
def default_embed_model(model_name, pretrained=None):
    """E5's CLIP when --embed_model is not given. Tiny presets: "toy-clip", the tiny CLIP trained
    on the toy world (plumbing/toy_clip.py: shipped with the code), so that ω (E6) sees each
    pair's content and style; RPO_DIFFUSION_TOY_E5=tiny picks the random tiny CLIP instead (the
    test suite's: no training, and no figure that depends on one). sd15/sdxl: CLIP ViT-L/14, or
    its shapes with random weights for --pretrained random."""
    if pretrained == "random":
        return "random"
    if PRESETS[model_name]["pretrained"] is None:
        return os.environ.get("RPO_DIFFUSION_TOY_E5") or "toy-clip"
    return "openai/clip-vit-large-patch14"


def load_embedder(name="tiny", device="cpu"):
    """CLIP in the joint text-image space, for f(c, x) (E5). `name`: a hub id or local folder
    (default for real presets: openai/clip-vit-large-patch14), "toy-clip" (the tiny CLIP trained on
    the toy world, plumbing/toy_clip.py), or "tiny" for a built-in random CLIP that keeps the tiny
    presets offline. Returns (model, tokenizer)."""
    if name == "toy-clip":
        model, tokenizer = toy_clip.load() or sys.exit("error: toy-clip's weights are neither shipped "
                                                       "(results/toy-study/toy-clip) nor cached: python -m toy.clip")
    elif name == "tiny":
        model, tokenizer = tiny.tiny_clip()
    elif name == "random":  # benchmarks: CLIP ViT-L/14's shapes, random weights
        model, tokenizer = random_weights.random_embedder(device)
    else:
        model, tokenizer = hub.load_clip(name, "--embed_model", "the CLIP embedder", device, tokenizer_only=True)
    return model.to(device).eval().requires_grad_(False), tokenizer


# ---------------------------------------------------------------------------------------
# E5's CLIP passes (the combination itself is loss.combine_features)
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
        text = torch.nn.functional.normalize(clip_output(clip.get_text_features(input_ids=ids)).float(), dim=-1)
    if images is not None:
        pixels = clip_pixels(clip, images)
        image = torch.nn.functional.normalize(clip_output(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
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
        z = z + cat("cache_latent_std").float() * share.keep(n, pairs).to(z.device)  # (z: on the GPU already)
    latents = (z * m.vae_scale).to(m.device)

    # caption dropout: the dropped rows get the unconditional input (m.empty: the cached encoding of "")
    hidden, pooled = unconditional_text(m, drop, batch["cache_text_hidden"], batch.get("cache_text_pooled"),
                                        m.empty["text_hidden"], m.empty.get("text_pooled"))
    cond = text_conditioning(m, hidden.to(m.dtype), None if pooled is None else pooled.to(m.dtype), sizes, crops,
                             repeat=2 if pairs else 1)
    # E5 embeds the pair's own prompt, dropped caption or not (dropout conditions the UNet only)
    return latents, cond, (batch["cache_clip_text"].float().to(m.device), cat("cache_clip_image").float().to(m.device))


# ---------------------------------------------------------------------------------------
# train.py's set-up from its flags
def from_args(args, device, dataset, resolution):
    """-> (m, policy). m: policy ε_θ (trainable), reference ε_ref (frozen), VAE, text
    encoders (model.load_models); with --lora_rank the policy is the frozen UNet + adapter and
    the reference that UNet with the adapter off (m.ref_unet is None). A cache holds what the
    encoders compute, so they are not loaded for one. policy: what the training forward calls
    (m.unet, or its DDP/FSDP wrapper)."""
    cached = args.data.startswith("cache:")
    m = load_models(args.model, args.pretrained, args.init, device, args.mixed_precision,
                    args.gradient_checkpointing == "all", reference=L.OBJECTIVES[args.loss]["pairs"], lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")), encoders=not cached)
    if args.gradient_checkpointing not in ("none", "all"):  # ("all": load_models' own)
        speed.apply_checkpointing(m.unet, args.gradient_checkpointing)
    for unet in (m.unet, m.ref_unet):  # in place: state_dict keys, save_pretrained and resume stay as they are
        speed.compile_unet(unet, args.compile)
    m.resolution = resolution
    if cached:
        m.vae_scale, m.empty = dataset.index["vae_scale"], dataset.empty  # s of the VAE that made the cache
    if m.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"error: unsupported scheduler prediction_type {m.scheduler.config.prediction_type!r}")

    return m, parallel.wrap_policy(m.unet, args.fsdp, device)


def unet_size(unet):
    return sum(p.numel() for p in unet.parameters())


if __name__ == "__main__":  # python model.py tiny: build a preset and print its parts
    m = load_models(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    print(json.dumps({"preset": m.name, "unet_params": unet_size(m.unet), "xl": m.xl, "resolution": m.resolution,
                      "vae": m.vae is not None, "text_encoders": len(m.text_encoders)}))

