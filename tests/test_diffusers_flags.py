"""The flags of diffusers' Diffusion-DPO and LoRA scripts: each works here with its meaning there
or stops with one line (plumbing/diffusers_flags.py), docs/from-diffusion-dpo.md lists every one
of them with what it does, and resuming behaves as it does there."""
import json
import os
import re

import pytest

import train
from plumbing import diffusers_flags as DF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_table():
    """{flag: kind} from docs/from-diffusion-dpo.md's table of the scripts' flags."""
    text = open(os.path.join(ROOT, "docs", "from-diffusion-dpo.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `(--\w+)` \| (alias|maps|same|refused) \|", text, flags=re.M)
    return dict(rows)


def test_the_docs_list_every_flag_with_what_it_does():
    assert doc_table() == {flag: kind for flag, (kind, _, _) in DF.TABLE.items()}


@pytest.mark.parametrize("flag", [f for f, (kind, _, _) in DF.TABLE.items() if kind == "alias"])
def test_an_alias_sets_what_its_twin_sets(flag, tmp_path):
    target = DF.TABLE[flag][1]
    value = {"--resume_from_checkpoint": "latest", "--output_dir": str(tmp_path), "--dataset_split_name": "test",
             "--pretrained_model_name_or_path": "/models/x", "--proportion_empty_prompts": "0.25",
             "--adam_epsilon": "1e-6", "--adam_weight_decay": "0.05", "--learning_rate": "3e-6"}.get(flag, "3")
    base = ["--model", "sd15", "--data", "x.jsonl", "--embed_model", "someone/clip"]  # (paths that exist, or hub ids)
    a, b = train.parse_args(base + [flag, value]), train.parse_args(base + [target, value])
    assert vars(a) == vars(b)


@pytest.mark.parametrize("flag", [f for f, (kind, _, _) in DF.TABLE.items() if kind == "refused"])
def test_a_refused_flag_stops_with_one_line(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args([flag, "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0
    assert f": error: {flag} is not taken: " in err and len(err) > 60


def test_names_that_mean_something_else_here_never_pass_silently(tmp_path, capsys):
    # --validation_steps: diffusers' "validate every N steps"
    args = train.parse_args(["--validation_steps", "5"])
    assert args.validation_every == 5 and args.validation_inference_steps == 25
    # --beta_dpo: -β·Δ in the SD1.5 script, -(β/2)·Δ in the SDXL one: refused, --beta named
    with pytest.raises(SystemExit):
        train.parse_args(["--beta_dpo", "2500"])
    assert "--beta" in capsys.readouterr().err


def test_mapped_flags(tmp_path):
    args = train.parse_args(["--dataset_name", "yuvalkirstain/pickapic_v1", "--use_8bit_adam", "--no_hflip",
                             "--lr_scheduler", "constant", "--lr_warmup_steps", "500", "--run_validation",
                             "--num_validation_images", "2", "--rank", "8", "--tracker_name", "t",
                             "--local_rank", "0", "--allow_tf32", "--loss_type", "sigmoid"])
    assert args.data == "pickapic:yuvalkirstain/pickapic_v1" and args.optimizer == "adamw8bit"
    assert args.random_flip is False and args.warmup_steps == 0  # diffusers' constant ignores the warm-up
    assert args.lora_rank == 8 and args.tracker_name == "t" and args.validation_seeds == [0, 1]
    assert len(args.validation_prompts) > 1  # the built-in validation prompts
    assert not any(k.startswith("diffusers_") for k in vars(args))  # args.json: this project's settings only
    for bad in (["--lr_scheduler", "cosine"], ["--loss_type", "ipo"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_num_train_epochs_sets_the_steps(tmp_path):
    out = tmp_path / "run"
    train.main(["--num_train_epochs", "1", "--num_items", "16", "--batch_size", "4", "--grad_accum", "2",
                "--no_progress", "--out_dir", str(out)])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(lines) == 2  # 16 pairs / (4 × 2) pairs a step


def test_resume_latest_in_a_fresh_folder_starts_and_checkpoint_n_is_found(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--num_items", "16", "--batch_size", "4", "--no_progress", "--out_dir", str(out)]
    train.main(base + ["--max_steps", "2", "--save_every", "1", "--resume_from_checkpoint", "latest"])
    assert "no checkpoint in" in capsys.readouterr().out and (out / "checkpoint-000002").is_dir()
    train.main(base + ["--max_steps", "3", "--resume_from_checkpoint", "checkpoint-2"])
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
