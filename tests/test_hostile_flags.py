"""Bad flags end in one line naming the flag and the valid range, before anything loads."""
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
