"""
The objectives of Diffusion-RPO and its baselines, as pure functions on tensors.

Nothing here knows about UNets, VAEs or data: train.py runs the networks and hands per-sample
denoising errors to these functions, so every equation of docs/method.md (E1..E9) sits in one short
file that the tests check against hand-computed numbers.

The functions, in the order this file defines them (one training step runs E8 before E1, as
docs/read-along.md does; docs/method.md numbers the equations E1..E9):
  denoising_error   E1  per-sample mean over the D latent entries of (eps - eps_theta)^2
  sample_timesteps  E8  one t per micro-batch (RPO default) or per pair (Diffusion-DPO)
  sample_noise      E8  winner and loser of a pair share their noise
  dpo_loss          E2, E3  the Diffusion-DPO baseline (E2 through _excess_errors)
  combine_features  E5  f(c, x) from CLIP halves that model.clip_features has normalised
  rpo_weights       E6  multi-modal similarity -> softmax weights over losers
  rpo_loss          E4, E7  every winner against every loser in the batch
  sft_loss          E9  plain denoising loss on winners

Conventions: err_w[i], err_l[i] are the policy's errors e_theta on winner i and loser i, shape (B,)
(train.py runs the stacked batch [winners; losers] and splits the errors with .chunk(2)); ref_err_w,
ref_err_l the frozen reference's e_ref. Every loss returns (loss, metrics to log, E9).
"""
import inspect
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# E1: per-sample denoising error
def denoising_error(pred, target):
    # E1: e(z, c, t, eps) = (1/D)·||eps - eps_theta(z_t, t, c)||^2, the mean over the D latent
    # entries of (eps - eps_theta)^2, one number per sample. The mean, not the sum, is what sets
    # beta's scale (docs/method.md, E2: beta = 2·T·D·beta_DDPO against Diffusion-DPO's equation).
    # Computed in fp32 whatever the network's dtype: the DPO/RPO logits multiply
    # differences of these errors by beta/2 = 2500, so bf16 rounding here would be amplified.
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------
# E8: step-wise timestep sampling
def sample_timesteps(num_pairs, num_train_timesteps=1000, mode="batch", generator=None, device="cpu"):
    """Timesteps for one micro-batch of `num_pairs` pairs, shape (num_pairs,), int64.

    E8: training never runs the sampling chain; it noises data latents at a random step t.
    mode="batch" (RPO default): one t for the whole micro-batch, so winner i and loser j of
      the contrast matrix (E4) are compared at the same step. This is this project's reading
      (docs/method.md, E8): a step-wise reward is a reward at one step, and with one t per pair
      an off-diagonal Δ_ij would compare gaps measured at two noise levels, whose sizes differ
      with t. train.py draws it for the *global* micro-batch (every rank's pairs: one t for all
      of them, whatever --global_contrast says), and anew for each micro-batch of an accumulated
      step: "the same t for i and j" needs no more than one t per contrast matrix.
    mode="pair" (Diffusion-DPO): one t per pair.
    Winner and loser of a pair always share t: train.py applies this vector to both halves.
    """
    if mode == "batch":
        t = torch.randint(0, num_train_timesteps, (1,), generator=generator).expand(num_pairs)
    elif mode == "pair":
        t = torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator)
    else:
        raise ValueError(f"timestep mode must be 'batch' or 'pair', got {mode!r}")
    return t.contiguous().to(device)


def sample_noise(shape, generator=None, device="cpu", dtype=torch.float32):
    """Noise eps for one micro-batch of pairs, shape (B, C, H, W).

    E8/E3: winner i and loser i share the same eps_i (and t_i), so the difference of their
    errors measures the images, not the luck of the noise draw. train.py uses this one
    tensor for both halves. Drawn on the CPU with `generator` so that a run is reproducible
    (and resumable) on any device, then moved.
    """
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Shared pieces of E3 and E7
def _excess_errors(err, ref_err):
    # e_θ - e_ref per sample: how much worse the policy denoises it than the frozen reference.
    # This is the negative of E2's step-wise implicit reward, r_t ∝ -(e_θ - e_ref): the logits
    # below put the minus sign and β/2 in, logit = -(β/2)·Δ. e_ref carries no gradient.
    # β's scale against Diffusion-DPO's equation, whose constant docs/method.md (E2) calls β_DDPO
    # (logit -β_DDPO·T·w(λ_t)·(‖ε-ε_θ‖² - ‖ε-ε_ref‖² - ...) with sums over the D latent entries,
    # T from its whole-chain derivation, its time weighting w(λ_t) = 1): that logit equals this
    # code's -(β/2)·Δ over means for β = 2·T·D·β_DDPO (tests/test_loss.py checks it).
    return err - ref_err.detach()


def _pair_metrics(err_w, err_l, ref_err_w, ref_err_l, diag_logits):
    # E9: the figures logged every step. The implicit accuracy is the fraction of pairs whose
    # own logit (the DPO logit, the diagonal of E4) prefers the winner.
    return {
        "implicit_acc": (diag_logits > 0).float().mean().item(),
        "reward_margin": diag_logits.mean().item(),
        "mse_w": err_w.mean().item(),
        "mse_l": err_l.mean().item(),
        "ref_mse_w": ref_err_w.mean().item(),
        "ref_mse_l": ref_err_l.mean().item(),
    }


# ---------------------------------------------------------------------------------------
# E3: Diffusion-DPO, the baseline
def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=5000.0):
    # E3: Δ_ii = (e_θ(w_i) - e_ref(w_i)) - (e_θ(l_i) - e_ref(l_i))
    delta = _excess_errors(err_w, ref_err_w) - _excess_errors(err_l, ref_err_l)
    # E3: logit_ii = -(β/2) Δ_ii; the 1/2 follows the official Diffusion-DPO code (docs/method.md, E3).
    logits = -0.5 * beta * delta
    # E3: L_DPO = -(1/B) Σ_i log σ(logit_ii). logsigmoid is the stable form of log(sigmoid()).
    loss = -F.logsigmoid(logits).mean()
    return loss, _pair_metrics(err_w, err_l, ref_err_w, ref_err_l, logits.detach())


# ---------------------------------------------------------------------------------------
# E5, E6: multi-modal weights
def combine_features(text, image, mode="mean", rows=None):
    """E5: f(c, x) = normalize(normalize(text) + normalize(image)) ("mean"), or normalize of one of them
    ("text" / "image"): the outer normalize. The inner ones are model.clip_features' (or a cache's it
    filled); raw CLIP halves would be weighted by their norms. text (B, D) is repeated to `rows`
    (default: image's k·B rows; [winners; losers]: k = 2). train.embed calls it."""
    if mode not in ("mean", "text", "image"):
        raise ValueError(f"embed mode must be 'mean', 'text' or 'image', got {mode!r}")
    rows = rows or len(image)
    parts = []
    if mode in ("mean", "text"):
        parts.append(text.repeat(rows // len(text), 1))
    if mode in ("mean", "image"):
        parts.append(image)
    return torch.nn.functional.normalize(sum(parts), dim=-1)  # E5: the outer normalize of the sum


def rpo_weights(emb_w, emb_l, tau=0.5):
    """ω (B_w × B_l): softmax over losers j of -d_ij/τ, with d_ij = 1 - cos(f_w_i, f_l_j).

    emb_w[i] = f(c_i, x^w_i) and emb_l[j] = f(c_j, x^l_j) are the E5 embeddings (combine_features). Every row sums to 1. No gradient flows through the weights (E6).
    """
    with torch.no_grad():
        emb_w = F.normalize(emb_w.float(), dim=-1)
        emb_l = F.normalize(emb_l.float(), dim=-1)
        # E6: d_ij = 1 - cos(f(c_i, x^w_i), f(c_j, x^l_j))
        dist = 1.0 - emb_w @ emb_l.T
        # E6: ω_ij = exp(-d_ij/τ) / Σ_j' exp(-d_ij'/τ): a softmax over j for each winner i.
        # Nothing here makes ω_ii, a winner's own loser, special: it is the largest weight of its
        # row only when that loser is the closest in f. With --embed text the pair's loser shares
        # its prompt (cos 1); with mean or image embeddings the largest weight can sit off the
        # diagonal (another prompt's loser that looks more like the winner).
        return torch.softmax(-dist / tau, dim=1)


def weight_entropy(weights):
    # E9: mean entropy of the weight rows (nats), between 0 and ln B: 0 when each winner puts all
    # its weight on one loser (its own or another prompt's: entropy does not say which), ln B when
    # ω is uniform (1/B everywhere). How spread ω is; where its weight sits is weight_diag's.
    w = weights.float().clamp_min(1e-30)
    return -(weights.float() * w.log()).sum(dim=1).mean().item()


# ---------------------------------------------------------------------------------------
# E4, E7: the Diffusion-RPO loss
def rpo_loss(err_w, err_l, ref_err_w, ref_err_l, weights, beta=5000.0, rpo_weighting="outside"):
    gap_w = _excess_errors(err_w, ref_err_w)  # (B,)
    gap_l = _excess_errors(err_l, ref_err_l)  # (B,)
    # E4: Δ_ij = (e_θ(w_i) - e_ref(w_i)) - (e_θ(l_j) - e_ref(l_j)) for every winner i, loser j.
    # A broadcast of two B-vectors: the B×B matrix costs B² scalars, nothing next to a UNet.
    delta = gap_w[:, None] - gap_l[None, :]
    # E4: logit_ij = -(β/2) Δ_ij
    logits = -0.5 * beta * delta
    weights = weights.to(logits.dtype).detach()
    B = logits.shape[0]
    if rpo_weighting == "outside":
        # E7, outside (this project's reading, the default): L = -(1/B) Σ_i Σ_j ω_ij log σ(logit_ij).
        # ω weighs each comparison and leaves its β alone; ω = I gives E3 exactly. 1/B (this
        # project's reading): each row of ω sums to 1, a weighted mean over losers averaged over
        # winners: DPO's scale (ln 2 at the start; the same gradient scale and clipping threshold;
        # not the same progress per unit lr, docs/method.md, "The learning rate").
        # Dividing by the B² contrasted pairs instead, as the LLM RPO's 1/(M·N) does, would give L/B:
        # B times smaller gradients and ω = I not equal to DPO (docs/method.md, E7, says why).
        loss = -(weights * F.logsigmoid(logits)).sum(dim=1).mean()
        terms = -weights * F.logsigmoid(logits.detach())  # (B, B): L = Σ_ij terms_ij / B, for the log
    elif rpo_weighting == "inside":
        # E7 (the LLM RPO release): L = -(1/B) Σ_i (1/B) Σ_j log σ(ω_ij · logit_ij), its 1/(M·N).
        # Also ln 2 at the start; with ω = I it is (1/B)·L_DPO + (1 - 1/B)·ln 2.
        loss = -F.logsigmoid(weights * logits).sum(dim=1).mean() / B
        terms = -F.logsigmoid(weights * logits.detach()) / B
    else:
        raise ValueError(f"rpo weighting must be 'outside' or 'inside', got {rpo_weighting!r}")
    diag = torch.diagonal(logits).detach()
    metrics = _pair_metrics(err_w, err_l, ref_err_w, ref_err_l, diag)
    # E9 for the whole contrast (implicit_acc, reward_margin: the diagonal only, as diffusers logs them):
    # contrast_acc = Σ_ij ω_ij·[logit_ij > 0] / B, the ω-weighted share of the B×B contrast preferring the
    # winner; offdiag_loss_share = the loss's share from the terms i ≠ j (0 when ω = I).
    metrics["contrast_acc"] = ((logits.detach() > 0).to(weights.dtype) * weights).sum(dim=1).mean().item()
    metrics["offdiag_loss_share"] = (1.0 - torch.diagonal(terms).sum() / terms.sum().clamp_min(1e-30)).item()
    metrics["weight_entropy"] = weight_entropy(weights)
    # Mean ω_ii, a winner's weight on its own loser: at 1.0 (ω = I) `outside` is DPO; `inside` is not.
    metrics["weight_diag"] = torch.diagonal(weights).float().mean().item()
    return loss, metrics


# ---------------------------------------------------------------------------------------
# E9: supervised fine-tuning baseline
def sft_loss(err_w):
    # E9: L_SFT = mean_i e_θ(w_i): the plain denoising loss, on winners only.
    loss = err_w.mean()
    return loss, {"mse_w": loss.item()}


# ---------------------------------------------------------------------------------------
# The objectives and every setting they read: the one list the rest derives from. train.py
# makes --loss's choices and one flag per setting from it, and calls fn; the resume check (no
# setting changes mid-run), the model card, the log line and docs/flags.md read it too. A new
# objective is a function above, one entry here (with its settings) and a test: docs/fork.md.
#   fn       the loss: fn(err_w, err_l, ref_err_w, ref_err_l[, weights], **its settings) -> (loss,
#            metrics); with pairs=False fn(err_w, **its settings), winners only and no reference
#   weights  True: fn takes E6's ω (B_w × B_l), computed from E5's embeddings
#   log      its diagnostics, shown on the log line (all metrics go to metrics.jsonl)
#   timesteps  E8's default for it: "batch" (one t per micro-batch) or "pair"
#   sample_t optional: E8's draw of t, sample_timesteps' signature (default sample_timesteps: t uniform)
OBJECTIVES = {
    "rpo": dict(fn=rpo_loss, pairs=True, weights=True, log=("contrast_acc", "offdiag_loss_share", "weight_diag",
                                                             "weight_entropy"), timesteps="batch",
                about="Diffusion-RPO: every winner against every loser of the micro-batch, weighted by ω (E4-E7)"),
    "dpo": dict(fn=dpo_loss, pairs=True, weights=False, log=(), timesteps="pair",
                about="Diffusion-DPO, the baseline: each winner against its own loser (E3)"),
    "sft": dict(fn=sft_loss, pairs=False, weights=False, log=(), timesteps="pair",
                about="supervised fine-tuning: the denoising loss on winners alone (E9)"),
}
# name -> type (bool: a --name/--no-name switch), default, losses (the objectives that read it, as
# a keyword of fn or in train.micro_batch_loss: a tuple of names, or "all", "pairs" (every objective
# on pairs), "weights" (every one that takes ω)), help; optional: choices (None: any), positive=True
# (above 0) or range=(low, high) (inclusive), checked only for the --loss that reads it (a number
# must be finite whatever it is). Each is a flag --name of train.py.
SETTINGS = {
    "beta": dict(type=float, default=5000.0, losses="pairs", positive=True,
                 help="E3/E4: logit = -(beta/2)·Δ, the official Diffusion-DPO convention"),
    "tau": dict(type=float, default=0.5, losses="weights", positive=True, help="E6: softmax temperature of ω"),
    "rpo_weighting": dict(type=str, default="outside", choices=("outside", "inside"), losses=("rpo",),
                          help="E7: ω outside the log-sigmoid (this project's reading) or inside (the LLM RPO code's)"),
    "embed": dict(type=str, default="mean", choices=("mean", "text", "image"), losses="weights",
                  help="E5: what f(c, x) embeds: prompt and image, or one of them"),
    "timesteps": dict(type=str, default=None, choices=("batch", "pair"), losses="all",
                      help="E8: one t per micro-batch or per pair (default: the objective's own)"),
}


def settings_of(name):
    """The settings objective `name` reads."""
    o = OBJECTIVES[name]
    group = {"all": True, "pairs": o["pairs"], "weights": o["weights"]}
    return [k for k, s in SETTINGS.items() if group.get(s["losses"], False) or name in s["losses"]]


def loss_kwargs(name, values):
    """The settings that objective `name`'s fn takes as keywords, from `values` (a dict of flags)."""
    params = inspect.signature(OBJECTIVES[name]["fn"]).parameters
    return {k: values[k] for k in settings_of(name) if k in params}


# Handy constant for tests and logs: the loss of any of the preference objectives above
# when the policy equals the reference (every logit is 0, log σ(0) = -ln 2).
LN2 = math.log(2.0)
