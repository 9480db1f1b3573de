"""
Why RPO's `outside` form needs several times DPO's learning rate for the same style (5-6x on the
toy's winter, 3-4x on sketch: docs/method.md, "The learning rate"): train each objective from the
toy base at one shared lr, as train.py does, and measure per step what its gradient and AdamW's
update look like.

    python -m toy.lr_gap --out results/toy-study/lr_gap.md      # 6 arms × 150 steps, ~10 min on a CPU core

For each arm (objective × E8's t sampling, the factorial's arms) it reports:
  cos(g_t, g_t-1)    the cosine between successive (clipped) gradients: how consistently the steps point
  net / path         |θ_N - θ_0| / Σ_t |θ_t - θ_t-1|: how much of AdamW's travel adds up (1: a straight line)
  |θ_N - θ_0|        how far the weights moved in N steps
  cos with ...       the cosine between this arm's θ_N - θ_0 and the first arm's: how much of its
                     travel goes the way the first arm's (DPO's, by default) goes
  |Δθ| per step      AdamW's update size (its normalisation makes it near lr·sqrt(#params) whatever the gradient)
  grad norm          before clipping (train.py clips at --max_grad_norm 1)
  off-diag loss      the share of the loss from the i ≠ j terms (loss.rpo_loss's offdiag_loss_share)
  off-diag grad      the share of the logits' gradient weight on i ≠ j (ω_ij·σ(-logit_ij) outside,
                     ω_ij·σ(-ω_ij·logit_ij) inside)
  winner/loser imbalance  mean over pairs of |pull on winner i - pull on loser i| / their sum, each
                     pull a row or column sum of that weight: 0 in DPO, where the pair's shared
                     prompt, noise and t cancel between the two errors' gradients
  flat tails         the share of the off-diagonal (resp. diagonal) logits with |logit| > 4, where σ' < 0.018
The run is train.py's loop on one process (the same flags, data order, draws, clipping and AdamW);
the logits are read by wrapping the objective's function for the duration of the measurement.
"""
import argparse
import functools
import os
import sys
import tempfile

import torch

import data
import loss as L
import model as M
import train
from plumbing import speed
from toy import experiment as E
from toy import factorial as X


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def measure(arm, lr, steps, seed, base):
    """Train `arm` for `steps` steps at `lr` from `base` -> per-step records."""
    with tempfile.TemporaryDirectory() as out:
        args = train.parse_args(["--model", "tiny", "--data", "toy", "--style", "winter", "--batch_size", "8",
                                 "--max_steps", str(steps), *X.ARMS[arm][0], "--embed_model", "toy-clip",
                                 "--init", os.path.join(base, "unet"), "--lr", str(lr), "--seed", str(seed),
                                 "--out_dir", out, "--device", "cpu"])
    device = "cpu"
    speed.device_defaults(args, device, real=False)
    dataset, resolution = data.from_args(args, 1)
    m, _ = M.from_args(args, device, dataset, resolution)
    embedder = train.embed(args, device=device) if L.OBJECTIVES[args.loss]["weights"] else None  # E5's model
    params = [p for p in m.unet.parameters() if p.requires_grad]
    optimizer = M.make_optimizer(args.optimizer, params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                                 args.weight_decay)
    seen = {}
    fn = L.OBJECTIVES[args.loss]["fn"]

    @functools.wraps(fn)  # (its signature stays fn's: train.py passes the settings fn names)
    def capture(err_w, err_l, ref_w, ref_l, *rest, **kw):  # the logits and ω of this step
        seen["gaps"] = ((err_w - ref_w).detach(), (err_l - ref_l).detach())
        seen["weights"] = rest[0].detach() if rest else torch.eye(len(err_w))
        return fn(err_w, err_l, ref_w, ref_l, *rest, **kw)

    stream = data.stream_batches(dataset, args.batch_size, args.seed, 0, 0)
    theta0, prev_g, records = flat(params).detach().clone(), None, []
    settings = L.loss_kwargs(args.loss, vars(args))
    L.OBJECTIVES[args.loss]["fn"] = capture
    # the wrapper passes on every setting fn takes (an inside run must not train as outside)
    assert L.loss_kwargs(args.loss, vars(args)) == settings, "lr_gap: the wrapped objective lost its settings"
    try:
        for step in range(steps):
            _, _, batch = next(stream)
            generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1009)  # train.py's
            loss, metrics = train.micro_batch_loss(m, batch, generator, args, None, m.unet, embedder)

            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            g = flat([p.grad for p in params]).detach().clone()
            before = flat(params).detach().clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after = flat(params).detach()
            gw, gl = seen["gaps"]
            logits = -0.5 * args.beta * (gw[:, None] - gl[None, :])
            w = seen["weights"].float()
            off = ~torch.eye(len(gw), dtype=torch.bool)
            # |∂L/∂logit_ij| up to one factor: ω·σ(-logit) outside (and DPO: ω = I), ω·σ(-ω·logit) inside
            inside = getattr(args, "rpo_weighting", "outside") == "inside" and args.loss == "rpo"
            pull = w * torch.sigmoid(-(w * logits if inside else logits))
            # the pull on winner i's error and on loser i's: equal in DPO, where they cancel what the
            # pair shares (prompt, noise, t); in RPO a winner and its own loser are pulled unequally
            on_w, on_l = pull.sum(dim=1), pull.sum(dim=0)
            records.append({
                "loss": loss.item(), "grad_norm": norm,
                "cos_prev": None if prev_g is None else torch.nn.functional.cosine_similarity(g, prev_g, dim=0).item(),
                "update": (after - before).norm().item(),
                "offdiag_loss_share": metrics.get("offdiag_loss_share", 0.0),
                "offdiag_grad_share": (pull[off].sum() / pull.sum().clamp_min(1e-30)).item(),
                "imbalance": ((on_w - on_l).abs() / (on_w + on_l).clamp_min(1e-30)).mean().item(),
                "tails_off": (logits[off].abs() > 4).float().mean().item(),
                "tails_diag": (torch.diagonal(logits).abs() > 4).float().mean().item(),
            })
            prev_g = g
        travel = flat(params).detach() - theta0
    finally:
        L.OBJECTIVES[args.loss]["fn"] = fn
    return records, travel


def summary(arm, records, travel, first):
    def mean(key, skip=0):
        v = [r[key] for r in records[skip:] if r[key] is not None]
        return sum(v) / len(v)
    net, path = travel.norm().item(), sum(r["update"] for r in records)
    along = torch.nn.functional.cosine_similarity(travel, first, dim=0).item()
    return (f"| {arm} | {mean('cos_prev', 1):.3f} | {net / path:.3f} | {net:.4f} | {along:.3f} | {mean('update'):.2e} | "
            f"{mean('grad_norm'):.2f} | {mean('offdiag_loss_share'):.2f} | {mean('offdiag_grad_share'):.2f} | "
            f"{mean('imbalance'):.2f} | "
            f"{mean('tails_off'):.2f} / {mean('tails_diag'):.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--lr", type=float, default=1e-6, help="the one lr every arm trains at")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="dpo t=pair,rpo outside t=batch,rpo inside t=batch,dpo t=batch,rpo outside t=pair,"
                   "rpo inside t=pair", help="comma list of toy.factorial's arms (the first is the others' reference)")
    p.add_argument("--runs", default="runs", help="where the toy base is cached (toy.experiment's)")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if any(a not in X.ARMS for a in arms):
        p.error(f"--arms: choose from {', '.join(X.ARMS)}")
    base = os.path.join(args.runs, "base")
    E.pretrain_base(base, "cpu", 1200)
    lines = [f"lr {args.lr:g} for every arm, {args.steps} steps × 8 pairs, seed {args.seed}, winter toy set, from the "
             f"shipped base; means over the steps", "",
             f"| arm | cos(g_t, g_t-1) | net / path | \\|θ_N - θ_0\\| | cos with {arms[0]}'s θ_N - θ_0 | \\|Δθ\\| per "
             "step | grad norm | off-diag loss | off-diag grad | winner/loser imbalance | flat tails off / diag |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first = None
    with speed.one_thread():
        for arm in arms:
            records, travel = measure(arm, args.lr, args.steps, args.seed, base)
            first = travel if first is None else first
            lines.append(summary(arm, records, travel, first))
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"python -m toy.lr_gap --lr {args.lr:g} --steps {args.steps} --seed {args.seed}\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
