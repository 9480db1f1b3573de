"""
The method, applied to one micro-batch: from a batch of preference pairs to the loss, in the
paper's order (docs/method.md, E1..E9). The equations themselves are loss.py's pure functions;
this file runs the networks around them. A reader follows one pair from the batch to the loss
in this file and loss.py. train.py's loop and bench/speed.py both call micro_batch_loss, so what is
benchmarked is what is trained.
"""
import contextlib

import torch

from plumbing import distributed as D
import loss as L
import model as M


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
    if "latents" in batch:  # already encoded (bench/speed.py, tests)
        return batch["latents"], batch["cond"], batch.get("features")
    pairs = args.loss != "sft"
    k = 2 if pairs else 1  # images per pair in the model's batch: [winners; losers], or winners alone
    rows = k * share.total  # the global batch's images
    drop = torch.zeros(share.n, dtype=torch.bool)
    if args.caption_dropout > 0:  # classifier-free guidance needs ε_θ(z_t, t, "") too
        drop = share.keep(torch.rand(share.total, generator=generator)) < args.caption_dropout
    both = (lambda w, l: torch.cat([w, l])) if pairs else (lambda w, l: w)
    sizes = both(batch["original_size_w"], batch["original_size_l"])
    crops = batch["crop_top_left"].repeat(k, 1)
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
    cond = M.encode_prompts(m, prompts, sizes, crops, repeat=k)
    features = None
    if args.loss == "rpo":  # E5's halves, one CLIP pass for [winners; losers], each prompt once
        features = M.clip_features(*embedder, None if args.embed == "image" else prompts,
                                   None if args.embed == "text" else images)
    return latents, cond, features
