"""What a training run reports and leaves behind: the start line (pairs per step, lr per pair),
metrics.jsonl, log lines, validation grids, TensorBoard event files, args.json, the model card,
and the diffusers training scripts' flag names."""
import json

import numpy as np
import pytest
from PIL import Image

import train

# the anchors' (diffusers' train_diffusion_dpo*.py) flag names, as a user would paste them
DIFFUSERS_FLAGS = ["--output_dir", "{out}", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                   "--learning_rate", "1e-4", "--max_train_steps", "3", "--checkpointing_steps", "2",
                   "--proportion_empty_prompts", "0.0"]


def test_diffusers_flag_names_mean_ours(tmp_path):
    flags = [f.format(out=tmp_path) for f in DIFFUSERS_FLAGS]
    args = train.parse_args(flags + ["--resume_from_checkpoint", "latest"])
    assert (args.out_dir, args.batch_size, args.grad_accum, args.lr, args.max_steps, args.save_every,
            args.caption_dropout, args.resume) == (str(tmp_path), 4, 2, 1e-4, 3, 2, 0.0, "latest")


def test_a_run_with_diffusers_flag_names_trains_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([f.format(out=out) for f in DIFFUSERS_FLAGS] + [
        "--num_items", "16", "--no_progress", "--log_every", "1", "--validation_prompts", "toy-test",
        "--validation_seeds", "0-1", "--validation_every", "2", "--report_to", "tensorboard",
        "--validation_metric", "toy"])
    text = capsys.readouterr().out
    # the start line: pairs per optimizer step (micro-batch × accumulation) and the per-pair lr
    assert "4×2 = 8 pairs/step" in text
    assert "lr 0.0001 per step = 1.25e-05 per pair" in text
    assert "step 3/3: loss" in text  # --no_progress: a line every --log_every steps
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3]
    # the toy scorer's style and content rates of the validation images, as curves
    assert ["val_toy_style" in r for r in lines] == [False, True, True]
    assert all(0 <= r[k] <= 1 for r in lines[1:] for k in ("val_toy_style", "val_toy_content"))
    # validation grids at step 2 and at the end: 12 toy-test prompts × 2 seeds of 16 px, enlarged 8×
    for step in (2, 3):
        grid = Image.open(out / "validation" / f"step-{step:06d}.png")
        assert grid.size == (2 * 16 * 8, 12 * 16 * 8)
    # TensorBoard: the scalars of every step and the validation images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert np.allclose([e.value for e in loss], [r["loss"] for r in lines], rtol=1e-6)
    assert [e.step for e in events.Images("validation/grid")] == [2, 3]
    # args.json: every resolved flag; the model card names base, data, objective and the grid
    args = json.load(open(out / "args.json"))
    assert args["lr"] == 1e-4 and args["beta"] == 5000 and args["data"] == "toy"
    card = open(out / "README.md").read()
    for text in ("`toy`", "beta = 5000", "tau = 0.5", "rpo_weighting = outside", "| pairs per optimizer step | 8 ", "| optimizer steps | 3 ",
                 "validation/step-000003.png", "python sample.py --model tiny --unet"):
        assert text in card, text


def test_scale_lr_reads_lr_per_pair(tmp_path, capsys):
    train.main(["--scale_lr", "--lr", "1e-8", "--batch_size", "4", "--grad_accum", "2", "--max_steps", "1",
                "--num_items", "16", "--no_progress", "--out_dir", str(tmp_path)])
    assert "lr 8e-08 per step = 1e-08 per pair" in capsys.readouterr().out
    assert json.load(open(tmp_path / "metrics.jsonl"))["lr"] == pytest.approx(8e-8)


def test_validation_prompts_need_the_encoders(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", f"cache:{tmp_path}", "--validation_prompts", "a cat"])
    assert "--validation_prompts needs the VAE and text encoders" in capsys.readouterr().err


def test_warmup_is_diffusers_constant_with_warmup(tmp_path):
    import torch
    from diffusers.optimization import get_constant_schedule_with_warmup
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=3)
    want = []
    for _ in range(6):  # what a diffusers training script's optimizer step k runs at
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    args = train.parse_args(["--lr", "1e-4", "--warmup_steps", "3"])
    assert [train.learning_rate(args, k) for k in range(6)] == pytest.approx(want)
    train.main(["--lr", "1e-4", "--warmup_steps", "3", "--max_steps", "5", "--batch_size", "4", "--num_items", "16",
                "--no_progress", "--out_dir", str(tmp_path)])
    assert [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl")] == pytest.approx(want[:5])


def test_recipe_paper_fills_the_papers_settings_and_flags_win(monkeypatch):
    args = train.parse_args(["--model", "sdxl", "--recipe", "paper"])
    assert (args.batch_size * args.grad_accum, args.lr, args.scale_lr, args.warmup_steps, args.max_steps,
            args.optimizer, args.resolution, args.beta) == (2048, 1e-8, True, 200, 2000, "adafactor", 1024, 5000.0)
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun: 2048 pairs over all processes
    args = train.parse_args(["--model", "sd15", "--recipe", "paper", "--batch_size", "16", "--max_steps", "10"])
    assert (args.batch_size, args.grad_accum, args.warmup_steps, args.max_steps) == (16, 16, 500, 10)


def test_validation_reward_curves_for_real_image_metrics(tmp_path, capsys):
    """--validation_metric clip,aesthetic (evaluate.py's reward models; tiny local stand-ins here)
    logs val_clip/val_aesthetic: the means evaluate.py computes from the saved validation images."""
    import torch
    import evaluate
    from test_rewards import save_tiny_reward_models
    models = save_tiny_reward_models(str(tmp_path / "rewards"))
    flags = f"--clip_model {models}/clip --aesthetic_head {models}/aesthetic.safetensors"
    out = tmp_path / "run"
    train.main(["--max_steps", "2", "--num_items", "16", "--batch_size", "2", "--no_progress", "--out_dir", str(out),
                "--validation_prompts", "a red circle on a blue background|a cat", "--validation_seeds", "0-1",
                "--validation_every", "1", "--validation_metric", "clip,aesthetic", "--validation_reward_flags", flags])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all("val_clip" in r and "val_aesthetic" in r for r in lines)
    folder = out / "validation" / "step-000002"
    paths = [str(folder / f"{i:03d}.png") for i in range(4)]
    prompts = ["a red circle on a blue background"] * 2 + ["a cat"] * 2
    ev = evaluate.parse_args(["--images", "-", *flags.split()])
    want = evaluate.score_rewards(evaluate.load_reward_models(["clip", "aesthetic"], ev, "cpu"), paths, prompts,
                                  ["clip", "aesthetic"])
    assert lines[-1]["val_clip"] == pytest.approx(want["clip"].mean().item(), rel=1e-5)
    assert lines[-1]["val_aesthetic"] == pytest.approx(want["aesthetic"].mean().item(), rel=1e-5)
    assert torch.isfinite(want["aesthetic"]).all()


@pytest.mark.parametrize("flags, message", [
    (["--validation_metric", "pickscore"], "pass --validation_prompts"),
    (["--validation_prompts", "a cat", "--validation_metric", "toy,clip"], "unknown toy"),
    (["--validation_prompts", "a cat", "--validation_metric", "clap"], "unknown clap"),
    (["--validation_prompts", "a cat", "--validation_metric", "clip", "--validation_reward_flags", "--nope 1"],
     "not evaluate.py reward-model flags"),
])
def test_validation_metric_mistakes_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([line for line in err if "error" in line]) == 1, err
