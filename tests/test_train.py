"""train.py end to end on the tiny presets: learning, resuming, checkpoints, bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import loss as L
import model as M
import train

FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def implicit_accuracy(m, batch, draws=8):
    """Mean DPO logit and implicit accuracy (E9) of the current policy on one batch, over
    several fixed (t, ε) draws: a measurement independent of the training loop's own logs."""
    accs, margins = [], []
    for d in range(draws):
        g = torch.Generator().manual_seed(1000 + d)
        B = len(batch["prompt"])
        z = M.encode_images(m, torch.cat([batch["winner"], batch["loser"]]), g)
        cond = M.encode_prompts(m, batch["prompt"], repeat=2)
        t = L.sample_timesteps(B, 1000, "pair", g).repeat(2)
        noise = L.sample_noise(z[:B].shape, g).repeat(2, 1, 1, 1)
        noisy = m.scheduler.add_noise(z, noise, t)
        with torch.no_grad():
            err = L.denoising_error(M.predict_noise(m.unet, noisy, t, cond), noise)
            ref = L.denoising_error(M.predict_noise(m.ref_unet, noisy, t, cond), noise)
        _, metrics = L.dpo_loss(*err.chunk(2), *ref.chunk(2), 5000.0)
        accs.append(metrics["implicit_acc"])
        margins.append(metrics["reward_margin"])
    return sum(accs) / draws, sum(margins) / draws


@pytest.mark.parametrize("objective", ["rpo", "dpo"])
def test_training_on_one_toy_batch_raises_its_implicit_accuracy(tmp_path, objective):
    # --num_items 4 --batch_size 4: every step sees the same 4 pairs (fresh t and ε each time)
    m = train.main(["--loss", objective, "--max_steps", "25", "--lr", "1e-3", "--out_dir", str(tmp_path), *FAST])
    ds = data.build_dataset("toy", 16, seed=0, num_items=4)
    batch = data.collate_pairs([ds[i] for i in range(4)])
    acc, margin = implicit_accuracy(m, batch)
    # before training the policy *is* the reference: every logit is 0, accuracy 0, margin 0
    assert acc >= 0.75 and margin > 0
    log = read_metrics(tmp_path)
    assert len(log) == 25 and log[0]["implicit_acc"] == 0.0
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-3)
    expected_keys = {"loss", "implicit_acc", "reward_margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l", "lr",
                     "grad_norm", "pairs_per_s", "step"}
    assert expected_keys <= set(log[-1])
    if objective == "rpo":
        assert 0.0 < log[-1]["weight_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    common = ["--loss", "rpo", "--lr", "1e-3", "--num_items", "8", "--batch_size", "2", "--grad_accum", "2",
              "--no_progress", "--random_flip"]
    train.main(common + ["--max_steps", "5", "--out_dir", str(tmp_path / "straight")])
    train.main(common + ["--max_steps", "3", "--out_dir", str(tmp_path / "split")])  # stops at 3 (epoch boundary inside)
    train.main(common + ["--max_steps", "5", "--out_dir", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(tmp_path / "straight" / "checkpoint-000005" / "optimizer.safetensors")
    ob = load_file(tmp_path / "split" / "checkpoint-000005" / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # the weights did move, so equality above is not two untouched copies
    start = M.load_models("tiny", reference=False).unet.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    # metrics: 5 lines in one file, 3 + 2 in the other
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in read_metrics(tmp_path / "split")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "straight")], rel=1e-6)


def test_checkpoint_layout_is_diffusers_and_safetensors_only(tmp_path):
    from diffusers import UNet2DConditionModel
    train.main(["--loss", "sft", "--data", "toy-base", "--max_steps", "4", "--save_every", "1",
                "--keep_checkpoints", "2", "--out_dir", str(tmp_path), *FAST])
    ckpts = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-000003", "checkpoint-000004"]  # older pruned, no .tmp left behind
    files = set(os.listdir(tmp_path / "checkpoint-000004"))
    assert files == {"unet", "optimizer.safetensors", "rng.safetensors", "state.json"}
    for root, _, names in os.walk(tmp_path):
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names)
    state = json.load(open(tmp_path / "checkpoint-000004" / "state.json"))
    assert state["step"] == 4 and state["args"]["loss"] == "sft"
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    saved = load_file(tmp_path / "checkpoint-000004" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())


def test_nan_loss_stops_with_one_line_and_keeps_the_weights(tmp_path, monkeypatch):
    dpo_loss = L.dpo_loss
    monkeypatch.setitem(L.OBJECTIVES["dpo"], "fn",  # (train.py calls the objective's registered function)
                        lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(dpo_loss(*a, **k)))
    with pytest.raises(SystemExit) as err:
        train.main(["--loss", "dpo", "--max_steps", "10", "--max_bad_steps", "3", "--out_dir", str(tmp_path), *FAST])
    msg = str(err.value)
    assert msg.startswith("error: 3 bad steps in a row at step 0 (last: non-finite loss)") and "\n" not in msg
    saved = load_file(tmp_path / "checkpoint-000000" / "unet" / "diffusion_pytorch_model.safetensors")
    start = M.load_models("tiny", reference=False).unet.state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in saved)  # no NaN update reached the weights


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size", "0"], None),
    (["--data", "nope.txt"], "nope.txt"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--data", "toy-base", "--loss", "rpo"], "--loss sft"),
    (["--resume", "missing-run"], "no checkpoint"),  # (--resume latest with none yet starts fresh: diffusers' rule)
])
def test_bad_flags_end_with_a_clear_error(tmp_path, argv, needle):
    with pytest.raises(SystemExit) as err:
        train.main(argv + ["--out_dir", str(tmp_path / "o"), "--no_progress", "--max_steps", "1"])
    if needle is None:
        assert err.value.code == 2  # argparse's usage error
    else:
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_metrics_keep_one_line_per_step_across_resumes_and_reruns(tmp_path):
    common = ["--loss", "dpo", "--lr", "1e-3", "--out_dir", str(tmp_path), *FAST]
    train.main(common + ["--max_steps", "3", "--save_every", "1", "--keep_checkpoints", "5"])
    # resume from the step-1 checkpoint: steps 2 and 3 are replayed, their old lines replaced
    train.main(common + ["--max_steps", "3", "--resume", str(tmp_path / "checkpoint-000001")])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    train.main(common + ["--max_steps", "2", "--overwrite"])  # starting over in the same folder: a fresh log
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_non_finite_gradients_are_bad_steps(tmp_path):
    # β = 1e38 passes the flag check (positive, finite) but overflows every gradient: no update
    # may happen, and the stop names the cause.
    with pytest.raises(SystemExit) as err:
        train.main(["--loss", "dpo", "--beta", "1e38", "--max_steps", "5", "--max_bad_steps", "2",
                    "--out_dir", str(tmp_path), *FAST])
    assert str(err.value).startswith("error: 2 bad steps in a row at step 0 (last: non-finite gradient)")
    saved = load_file(tmp_path / "checkpoint-000000" / "unet" / "diffusion_pytorch_model.safetensors")
    start = M.load_models("tiny", reference=False).unet.state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in saved)
