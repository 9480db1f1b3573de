"""bench/speed.py on the CPU: its FLOP count against an independent count, and the loss-list summary."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import speed as bench
import model as M
import train


def forward_flops(name, B):
    """FLOPs of ONE policy forward on B samples, counted independently of bench.run."""
    m = M.load_models(name, reference=False)
    batch = bench.fake_batch(m, name, B, m.resolution, torch.Generator().manual_seed(0))
    latents, cond = batch["latents"][:B], batch["cond"]
    cond = {k: (v[:B] if torch.is_tensor(v) else {kk: vv[:B] for kk, vv in v.items()}) for k, v in cond.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        M.predict_noise(m.unet, latents, torch.zeros(B, dtype=torch.long), cond)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_step_flops_are_policy_forward_backward_plus_reference_forward(name):
    B = 2
    f = forward_flops(name, 2 * B)  # [winners; losers]
    dpo = bench.run(dict(model=name, init="random", loss="dpo", batch_size=B, resolution=None, steps=1, warmup=0,
                         mixed_precision="no", gradient_checkpointing=True, compile=False, optimizer="adamw",
                         channels_last=False, device="cpu", lora_rank=0))
    # backward ≈ 2× forward (grads w.r.t. inputs and weights; the first layer skips its input
    # grad, so a little less), plus the reference's forward: ≈ 4F. Checkpointing must not count.
    assert 3.7 * f < dpo["flops_per_step"] < 4.0 * f + 1e6
    sft = bench.run(dict(dpo, loss="sft"))  # winners only, no reference: ≈ 3 × F(B) = 1.5 F(2B)
    assert 1.35 * f < sft["flops_per_step"] < 1.5 * f + 1e6


def test_loss_list_reports_each_median_and_their_ratio(capsys):
    bench.main(["--model", "tiny", "--loss", "rpo,dpo", "--batch_size", "2", "--steps", "1", "--warmup", "0",
                "--repeat", "3", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [r["loss"] for r in runs] == ["rpo", "dpo"] * 3  # interleaved
    for loss in ("rpo", "dpo"):
        times = sorted(r["ms_per_step"] for r in runs if r["loss"] == loss)
        assert summary["median_ms_per_step"][loss] == times[1]
    assert summary["rpo_over_dpo"] == pytest.approx(
        summary["median_ms_per_step"]["rpo"] / summary["median_ms_per_step"]["dpo"], abs=1e-3)
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--loss", "ppo"])


def test_flags_it_does_not_know_go_to_train_py(monkeypatch, capsys):
    """Any train.py flag (an objective's setting) reaches the timed step; a flag neither knows is one error."""
    seen = []
    real = train.micro_batch_loss
    monkeypatch.setattr(train, "micro_batch_loss", lambda m, batch, g, args, **k: seen.append(
        (args.loss, args.tau, args.rpo_weighting)) or real(m, batch, g, args, **k))
    bench.main(["--model", "tiny", "--loss", "rpo,dpo", "--batch_size", "2", "--steps", "1", "--warmup", "0",
                "--tau", "0.1", "--rpo_weighting", "inside", "--json"])
    assert ("rpo", 0.1, "inside") in seen and ("dpo", 0.1, "inside") in seen
    with pytest.raises(SystemExit):
        bench.parse_args(["--no_such_flag", "1"])
    assert "neither bench/speed.py nor train.py" in capsys.readouterr().err
