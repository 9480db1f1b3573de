"""Bad flags end in one line naming the flag and the valid range, before anything loads."""
import os

import pytest
import torch

import model as M
import train

CASES = {  # flags -> the one line argparse prints after "train.py: error: "
    ("--beta", "-5000"): "--beta must be a positive finite number, not -5000.0",
    ("--beta", "0"): "--beta must be a positive finite number, not 0.0",
    ("--beta", "inf"): "--beta must be a positive finite number, not inf",
    ("--lr", "nan"): "--lr must be a positive finite number, not nan",
    ("--lr=-1e-4",): "--lr must be a positive finite number, not -0.0001",
    ("--tau", "nan"): "--tau must be a positive finite number, not nan",
    ("--max_grad_norm", "-1"): "--max_grad_norm must be a positive finite number, not -1.0",
    ("--warmup_steps", "-5"): "--warmup_steps must be 0 or more, not -5",
    ("--seed", "-1"): "--seed must be 0 or more, not -1",
    ("--num_workers", "-1"): "argument --num_workers: must be auto or 0 or more, not -1",
    ("--num_workers", "four"): "argument --num_workers: must be auto or 0 or more, not four",
    ("--resolution", "0"): "--resolution must be a positive multiple of 2 for --model tiny (what its VAE and UNet "
                           "down-sample by), not 0",
    ("--resolution", "-16"): "--resolution must be a positive multiple of 2 for --model tiny (what its VAE and UNet "
                             "down-sample by), not -16",
    ("--model", "sd15", "--resolution", "500"): "--resolution must be a positive multiple of 64 for --model sd15 (what "
                                                "its VAE and UNet down-sample by), not 500",
    ("--device", "foo"): "--device foo: no such device here (auto, cpu; no GPU is visible)",
    ("--device", "cuda:7"): "--device cuda:7: no such device here (auto, cpu; no GPU is visible)",
    ("--gradient_checkpointing", "transformer:2"): "--gradient_checkpointing transformer:2: choose none, all, "
                                                   "transformer, alternate, resnet, hires or transformer:F with 0 < F <= 1",
    ("--caption_dropout", "2"): "--caption_dropout is a probability: between 0 and 1, not 2.0",
    ("--style_fraction", "-0.1"): "--style_fraction is a probability: between 0 and 1, not -0.1",
    ("--keep_checkpoints", "0"): "--keep_checkpoints must be at least 1",
    ("--batch_size", "0"): "--batch_size must be at least 1",
    # issue #28: values that broke later, after the models loaded
    ("--adam_beta1", "2"): "--adam_beta1 must be at least 0 and below 1, not 2.0",
    ("--adam_beta2", "1"): "--adam_beta2 must be at least 0 and below 1, not 1.0",
    ("--weight_decay", "-1"): "--weight_decay must be 0 or more, not -1.0",
    ("--adam_eps", "nan"): "--adam_eps must be a finite number, not nan",
    ("--adam_eps", "0"): "--adam_eps must be a positive finite number, not 0.0",
    ("--seed", str(2 ** 40)): f"--seed must be at most 4294967295, not {2 ** 40}",
    ("--max_steps", str(2 ** 63)): f"--max_steps must be at most 2147483647, not {2 ** 63}",
    ("--lora_rank", "4", "--lora_alpha", "inf"): "--lora_alpha must be a finite number, not inf",
    ("--lora_rank", "4", "--lora_alpha", "0"): "--lora_alpha must be positive, not 0.0",
    ("--validation_guidance", "nan"): "--validation_guidance must be a finite number, not nan",
    ("--validation_guidance", "-3"): "--validation_guidance must be between 0 and 100, not -3.0",
    ("--validation_inference_steps", "5000"): "--validation_inference_steps must be at most 1000, not 5000",
    ("--shuffle_window", "0"): "--shuffle_window must be at least 1, not 0",
    ("--num_items", "0"): "--num_items must be at least 1, not 0",
    ("--validation_prompts", "toy-test", "--validation_seeds", "0-99999999999"):
        "--validation_seeds: bad seeds '0-99999999999': at most 10000 seeds, each from 0 to 4294967295",
    ("--out_dir", ""): "--out_dir is empty: name a folder",
}


@pytest.mark.parametrize("flags", list(CASES), ids=[" ".join(f) for f in CASES])
def test_bad_flag_is_one_line(flags, capsys):
    if "--device" in flags and torch.cuda.is_available():
        pytest.skip("the message names the GPUs of a machine that has them")
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(list(flags))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": error: " + CASES[flags])  # (argparse names the program: train.py)


def test_init_from_another_preset_is_one_line(tmp_path):
    M.load_models("tiny-xl", reference=False).unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", "tiny", "--init", str(tmp_path / "unet"), "--out_dir", str(tmp_path / "run"),
                    "--max_steps", "1", "--no_progress"])
    assert str(exit_.value) == (f"error: --init {tmp_path / 'unet'} does not fit --model tiny: its in_channels is 4, "
                                f"the preset's 3; pass the --model it was trained with")


def test_init_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--init", "someone/unet-repo", "--out_dir", str(tmp_path), "--max_steps", "1", "--no_progress"])
    assert str(exit_.value) == ("error: --init someone/unet-repo: not a local folder, and it could not be downloaded "
                                "from the Hugging Face hub (HF_HUB_OFFLINE is set and it is not in the local cache); "
                                "download it where there is network (hf download someone/unet-repo) and pass its folder")


def test_init_from_a_damaged_unet_is_one_line(tmp_path):
    """--init shares sample.py's --unet loader: a cut weights file or a broken config.json is named
    in one line, before any model is built."""
    M.load_models("tiny", reference=False).unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    argv = ["--model", "tiny", "--init", str(tmp_path / "unet"), "--out_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--no_progress"]
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert str(exit_.value).startswith(f"error: --init {tmp_path / 'unet'}: {weights} is truncated or corrupt (")
    weights.unlink()
    (tmp_path / "unet" / "config.json").write_text("{broken")
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert str(exit_.value).startswith(f"error: --init {tmp_path / 'unet'}: cannot load the UNet in {tmp_path / 'unet'} (")
    assert "\n" not in str(exit_.value)


# ---------------------------------------------------------------------------------------
# Paths: refused by parse_args, before a model loads (issue #28)


def parse_error(parse, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]


def test_out_dir_that_cannot_be_made_or_written(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert parse_error(train.parse_args, ["--out_dir", tmp_path / "file" / "run"], capsys) == \
        f"--out_dir {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere but on a read-only file system
            locked = "/proc/sys" if not os.access("/proc/sys", os.W_OK) else pytest.skip("no unwritable folder here")
        assert parse_error(train.parse_args, ["--out_dir", f"{locked}/run"], capsys).startswith(
            f"--out_dir {locked}/run: {locked} is not writable")
    finally:
        (tmp_path / "locked").chmod(0o755)


@pytest.mark.parametrize("value, message", [
    ("prompts.txt", "{flag} prompts.txt: no such file"),
    ("missing/", "{flag} missing/: no such file"),
    ("prompts/", "{flag} prompts/ is a folder, not a file"),
    ("{dir}", "{flag} {dir} is a folder, not a file"),
    ("{dir}/", "{flag} {dir}/ is a folder, not a file"),
])
def test_a_prompts_value_that_names_a_file_must_be_one(tmp_path, monkeypatch, capsys, value, message):
    """sample.py --prompts and train.py --validation_prompts: a value that looks like a file path
    (a file suffix, or a separator and no blank) or exists is read as a file, never sampled as text."""
    import sample
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    fill = dict(dir=tmp_path / "prompts")
    for parse, flag in ((sample.parse_args, "--prompts"), (train.parse_args, "--validation_prompts")):
        assert parse_error(parse, [flag, value.format(**fill)], capsys) == message.format(flag=flag, **fill)
    assert sample.read_prompts("AC/DC on stage|a cat") == ["AC/DC on stage", "a cat"]  # text, blanks and all


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "nan"], "--guidance must be a finite number from 0 to 100, not nan"),
    (["--guidance", "inf"], "--guidance must be a finite number from 0 to 100, not inf"),
    (["--guidance", "-1"], "--guidance must be a finite number from 0 to 100, not -1.0"),
    (["--steps", "5000"], "--steps must be at most 1000, not 5000"),
    (["--seeds", "4294967296"], "argument --seeds: bad seeds '4294967296': at most 10000 seeds, each from 0 to 4294967295"),
    (["--seeds", "0-99999999999"], "argument --seeds: bad seeds '0-99999999999': at most 10000 seeds, each from 0 to "
                                   "4294967295"),
    (["--grid_scale", "1000"], "--grid_scale must be at most 64, not 1000"),
])
def test_sample_numbers_out_of_range(capsys, argv, message):
    import sample
    assert parse_error(sample.parse_args, argv, capsys) == message


@pytest.mark.parametrize("argv, message", [
    (["--bootstrap", "0"], "--bootstrap must be from 1 to 1000000, not 0"),
    (["--bootstrap_seed", "-1"], "--bootstrap_seed must be from 0 to 4294967295, not -1"),
    (["--resolution", "0"], "--resolution must be from 8 to 512, not 0"),
    (["--out", "{tmp}"], "--out {tmp} is a folder, not a file"),
    (["--out", "{tmp}/no/results.json"], "--out {tmp}/no/results.json: no folder {tmp}/no"),
    (["--style_points", "{tmp}/points.json"], "--style_points {tmp}/points.json: no such file"),
])
def test_evaluate_numbers_and_files(tmp_path, capsys, argv, message):
    import evaluate
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert parse_error(evaluate.parse_args, ["--images", "x", *argv], capsys) == message.format(tmp=tmp_path)


def test_out_dir_contents_that_would_fail_late_are_refused_before_loading(tmp_path, monkeypatch):
    """A logs path that is a file (--report_to tensorboard), a file where the final unet/ goes:
    one line from check_out_dir, before the models load."""
    monkeypatch.setattr(M, "from_args", lambda *a: pytest.fail("the models loaded"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "logs").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out_dir", str(out), "--report_to", "tensorboard", "--max_steps", "1", "--no_progress"])
    assert exit_.value.code == f"error: {out / 'logs'} is a file; the run writes its logs folder there: move it away"
    os.remove(out / "logs")
    (out / "unet").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out_dir", str(out), "--max_steps", "1", "--no_progress"])
    assert exit_.value.code == f"error: {out / 'unet'} is a file; the run writes its unet folder there: move it away"
