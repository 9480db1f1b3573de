"""loss.py against hand-computed numbers and the invariants of E1..E9 (docs/method.md)."""
import math

import pytest
import torch

import loss as L


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# A 2×2 example, small β so the numbers stay readable:
#   gaps (e_θ - e_ref): winners [-0.05, 0.05], losers [0.02, -0.05]
ERR_W, REF_W = torch.tensor([0.30, 0.50]), torch.tensor([0.35, 0.45])
ERR_L, REF_L = torch.tensor([0.40, 0.20]), torch.tensor([0.38, 0.25])
BETA = 10.0
OMEGA = torch.tensor([[0.7, 0.3], [0.4, 0.6]])


def hand_logits():
    gw = [0.30 - 0.35, 0.50 - 0.45]
    gl = [0.40 - 0.38, 0.20 - 0.25]
    return [[-(BETA / 2) * (gw[i] - gl[j]) for j in range(2)] for i in range(2)]


def test_denoising_error_is_per_sample_mean_square():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]])
    target = torch.zeros(2, 2, 2)
    assert torch.allclose(L.denoising_error(pred, target), torch.tensor([30 / 4, 4 / 4]))


def test_dpo_hand_computed_2x2():
    loss, metrics = L.dpo_loss(ERR_W, ERR_L, REF_W, REF_L, BETA)
    lg = hand_logits()  # diagonal: [0.35, -0.5]
    expected = -(log_sigmoid(lg[0][0]) + log_sigmoid(lg[1][1])) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.753729, abs=1e-5)  # worked by hand
    assert metrics["implicit_acc"] == pytest.approx(0.5)  # logits 0.35 > 0, -0.5 < 0
    assert metrics["reward_margin"] == pytest.approx((0.35 - 0.5) / 2, abs=1e-6)


def test_rpo_outside_hand_computed_2x2():
    loss, metrics = L.rpo_loss(ERR_W, ERR_L, REF_W, REF_L, OMEGA, BETA, "outside")
    lg = hand_logits()
    expected = -sum(OMEGA[i, j].item() * log_sigmoid(lg[i][j]) for i in range(2) for j in range(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.737070, abs=1e-5)  # worked by hand
    assert metrics["weight_diag"] == pytest.approx(0.65)
    row_entropy = lambda p: -sum(x * math.log(x) for x in p)
    assert metrics["weight_entropy"] == pytest.approx((row_entropy([0.7, 0.3]) + row_entropy([0.4, 0.6])) / 2, abs=1e-6)


def test_rpo_inside_hand_computed_2x2():
    loss, _ = L.rpo_loss(ERR_W, ERR_L, REF_W, REF_L, OMEGA, BETA, "inside")
    lg = hand_logits()
    expected = -sum(log_sigmoid(OMEGA[i, j].item() * lg[i][j]) for i in range(2) for j in range(2)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_sft_is_mean_winner_error():
    loss, metrics = L.sft_loss(torch.tensor([0.1, 0.2, 0.6]))
    assert loss.item() == pytest.approx(0.3) and metrics["mse_w"] == pytest.approx(0.3)


def random_errors(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]


def test_rpo_with_identity_weights_equals_dpo():
    err_w, err_l, ref_w, ref_l = random_errors(6)
    dpo, _ = L.dpo_loss(err_w, err_l, ref_w, ref_l, 5000.0)
    rpo, _ = L.rpo_loss(err_w, err_l, ref_w, ref_l, torch.eye(6, dtype=torch.float64), 5000.0, "outside")
    assert abs(dpo.item() - rpo.item()) < 1e-6
    assert dpo.item() > 0.1  # not a trivial equality of two zeros


@pytest.mark.parametrize("weighting", ["outside", "inside"])
def test_loss_is_ln2_when_policy_equals_reference(weighting):
    err_w, err_l, _, _ = random_errors(5)
    weights = torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    rpo, _ = L.rpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), weights, 5000.0, weighting)
    dpo, _ = L.dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), 5000.0)
    assert rpo.item() == pytest.approx(math.log(2), abs=1e-7)
    assert dpo.item() == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize("which", ["dpo", "outside", "inside"])
def test_lowering_a_winner_error_lowers_the_loss(which):
    err_w, err_l, ref_w, ref_l = random_errors(4, seed=3)
    weights = L.rpo_weights(torch.randn(4, 8), torch.randn(4, 8), 0.5)

    def f(ew):
        if which == "dpo":
            return L.dpo_loss(ew, err_l, ref_w, ref_l, 50.0)[0].item()
        return L.rpo_loss(ew, err_l, ref_w, ref_l, weights, 50.0, which)[0].item()
    lower = err_w.clone()
    lower[2] -= 0.01
    assert f(lower) < f(err_w)
    higher_loser = err_l.clone()  # and raising a loser's error lowers it too
    higher_loser[1] += 0.01
    if which == "dpo":
        assert L.dpo_loss(err_w, higher_loser, ref_w, ref_l, 50.0)[0] < L.dpo_loss(err_w, err_l, ref_w, ref_l, 50.0)[0]


def test_reference_errors_get_no_gradient():
    err_w, err_l, ref_w, ref_l = [x.clone().requires_grad_(True) for x in random_errors(3)]
    loss, _ = L.rpo_loss(err_w, err_l, ref_w, ref_l, torch.eye(3, dtype=torch.float64), 100.0)
    loss.backward()
    assert ref_w.grad is None and ref_l.grad is None
    assert (err_w.grad > 0).all()  # lowering a winner's error lowers the loss, for every winner


def test_weights_rows_sum_to_one_and_carry_no_gradient():
    emb_w = torch.randn(7, 16, requires_grad=True)
    emb_l = torch.randn(7, 16)
    w = L.rpo_weights(emb_w, emb_l, 0.5)
    assert w.shape == (7, 7)
    assert torch.allclose(w.sum(dim=1), torch.ones(7), atol=1e-6)
    assert not w.requires_grad
    # E6 by hand for one entry
    f_w, f_l = torch.nn.functional.normalize(emb_w.detach(), dim=1), torch.nn.functional.normalize(emb_l, dim=1)
    d = 1 - f_w @ f_l.T
    expected = math.exp(-d[2, 4].item() / 0.5) / sum(math.exp(-d[2, j].item() / 0.5) for j in range(7))
    assert w[2, 4].item() == pytest.approx(expected, rel=1e-5)


def test_weights_become_one_hot_on_nearest_loser_as_tau_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    emb_w, emb_l = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    w = L.rpo_weights(emb_w, emb_l, 1e-4)
    cos = torch.nn.functional.normalize(emb_w, dim=1) @ torch.nn.functional.normalize(emb_l, dim=1).T
    assert torch.equal(w.argmax(dim=1), cos.argmax(dim=1))
    assert torch.allclose(w.max(dim=1).values, torch.ones(5), atol=1e-4)
    # and uniform as τ → ∞
    assert torch.allclose(L.rpo_weights(emb_w, emb_l, 1e6), torch.full((5, 5), 0.2), atol=1e-5)


def test_timesteps_batch_mode_shares_one_t_and_pair_mode_draws_per_pair():
    g = torch.Generator().manual_seed(0)
    t = L.sample_timesteps(16, 1000, "batch", g)
    assert t.shape == (16,) and t.dtype == torch.int64 and (t == t[0]).all()
    t = L.sample_timesteps(16, 1000, "pair", torch.Generator().manual_seed(0))
    assert len(set(t.tolist())) > 8 and t.min() >= 0 and t.max() < 1000
    again = L.sample_timesteps(16, 1000, "pair", torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError):
        L.sample_timesteps(4, 1000, "step", g)


def test_unknown_weighting_is_an_error():
    e = torch.zeros(2)
    with pytest.raises(ValueError):
        L.rpo_loss(e, e, e, e, torch.eye(2), 1.0, "sideways")


def test_beta_relation_to_diffusion_dpos_equation():
    """E2/E3: Diffusion-DPO's logit -β_DDPO·T·w(λ_t)·(‖ε-ε_θ(w)‖² - ‖ε-ε_ref(w)‖² - (same for l)),
    with sums over the D latent entries and its time weighting w(λ_t) = 1, is this code's -(β/2)·Δ
    over means for β = 2·T·D·β_DDPO (docs/method.md, E2). Computed independently with sums, from
    raw predictions."""
    g = torch.Generator().manual_seed(0)
    B, shape, T, beta = 3, (4, 8, 8), 1000, 5000.0
    D = 4 * 8 * 8
    eps = torch.randn(B, *shape, generator=g)
    pw, pl, rw, rl = (eps + 0.1 * torch.randn(B, *shape, generator=g) for _ in range(4))
    sq = lambda pred: (eps - pred).pow(2).flatten(1).sum(1)  # ‖ε - ε_·‖², summed over D
    beta_ddpo = beta / (2 * T * D)
    logit = -beta_ddpo * T * 1.0 * ((sq(pw) - sq(rw)) - (sq(pl) - sq(rl)))
    ddpo = -torch.nn.functional.logsigmoid(logit).mean()
    code, _ = L.dpo_loss(L.denoising_error(pw, eps), L.denoising_error(pl, eps), L.denoising_error(rw, eps),
                         L.denoising_error(rl, eps), beta)
    assert code.item() == pytest.approx(ddpo.item(), rel=1e-5)
    assert abs(ddpo.item() - L.LN2) > 1e-3  # (the errors differ: a real check, not ln 2 = ln 2)


def test_outside_normalisation_is_dpo_scale_and_b_times_the_per_pair_mean():
    """E7: the outside form (1/B)·Σ_ij ω_ij·(-log σ) is B times the form normalised by the B²
    contrasted pairs, and starts at ln 2 like DPO: logged RPO and DPO losses are comparable."""
    g = torch.Generator().manual_seed(1)
    B = 5
    ew, el, rw, rl = (torch.rand(B, generator=g) for _ in range(4))
    w = torch.softmax(torch.randn(B, B, generator=g), dim=1)
    outside, _ = L.rpo_loss(ew, el, rw, rl, w, 50.0, "outside")
    logits = -25.0 * ((ew - rw)[:, None] - (el - rl)[None, :])
    per_pair_mean = -(w * torch.nn.functional.logsigmoid(logits)).sum() / B ** 2
    assert outside.item() == pytest.approx(B * per_pair_mean.item(), rel=1e-6)
    start_rpo, _ = L.rpo_loss(ew, el, ew, el, w, 50.0, "outside")
    start_dpo, _ = L.dpo_loss(ew, el, ew, el, 50.0)
    assert start_rpo.item() == pytest.approx(L.LN2) and start_dpo.item() == pytest.approx(L.LN2)


def test_whole_contrast_diagnostics_by_hand():
    """contrast_acc = Σ_ij ω_ij·[logit_ij > 0] / B and offdiag_loss_share = 1 - Σ_i term_ii / Σ_ij term_ij,
    on a 2×2 contrast worked by hand; with ω = I they are DPO's implicit_acc and 0."""
    beta = 2.0  # logit_ij = -(β/2)·Δ_ij = -Δ_ij
    err_w, err_l = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0])
    zero = torch.zeros(2)
    # Δ_ij = err_w[i] - err_l[j]: [[-1, -3], [0, -2]] -> logits [[1, 3], [0, 2]]: all but (1, 0) > 0
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    _, m = L.rpo_loss(err_w, err_l, zero, zero, w, beta=beta)
    assert m["contrast_acc"] == pytest.approx((0.75 + 0.25 + 0.5) / 2)
    sp = lambda x: math.log1p(math.exp(-x))  # -log σ(x)
    terms = [[0.75 * sp(1), 0.25 * sp(3)], [0.5 * sp(0), 0.5 * sp(2)]]
    total = sum(map(sum, terms))
    assert m["offdiag_loss_share"] == pytest.approx((terms[0][1] + terms[1][0]) / total)
    _, inside = L.rpo_loss(err_w, err_l, zero, zero, w, beta=beta, rpo_weighting="inside")
    terms = [[sp(0.75 * 1), sp(0.25 * 3)], [sp(0.5 * 0), sp(0.5 * 2)]]
    assert inside["offdiag_loss_share"] == pytest.approx((terms[0][1] + terms[1][0]) / sum(map(sum, terms)))
    _, dpo = L.dpo_loss(err_w, err_l, zero, zero, beta=beta)
    _, eye = L.rpo_loss(err_w, err_l, zero, zero, torch.eye(2), beta=beta)
    assert eye["contrast_acc"] == dpo["implicit_acc"] and eye["offdiag_loss_share"] == 0.0
