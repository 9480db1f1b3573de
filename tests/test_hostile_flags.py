"""Bad flags end in one line naming the flag and the valid range, before anything loads."""
import pytest

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
    ("--num_workers", "-1"): "--num_workers must be 0 or more, not -1",
    ("--resolution", "0"): "--resolution must be positive, not 0",
    ("--resolution", "-16"): "--resolution must be positive, not -16",
    ("--caption_dropout", "2"): "--caption_dropout is a probability: between 0 and 1, not 2.0",
    ("--style_fraction", "-0.1"): "--style_fraction is a probability: between 0 and 1, not -0.1",
    ("--keep_checkpoints", "0"): "--keep_checkpoints must be at least 1",
    ("--batch_size", "0"): "--batch_size must be at least 1",
}


@pytest.mark.parametrize("flags", list(CASES), ids=[" ".join(f) for f in CASES])
def test_bad_flag_is_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(list(flags))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": error: " + CASES[flags])  # (argparse names the program: train.py)
