"""A fourth hostile pass over train.py and what it reads, a class each: numbers whose size alone
exhausts memory (--resolution, --num_items), a --logging_dir that leads out of --out_dir, a path
the file system cannot even look up (a name over 255 bytes) in a manifest or as --data, a pair
whose winner and loser are one image (a manifest's one file, a parquet mapping's one column), a
cache index whose values are of the right type but wrong (a VAE scale of 0 or nan, a count that
is a boolean, a shard outside the cache), a --resume that changes the reference model or the data
and E5 settings that only a note mentioned, an --out_dir whose name holds a control character,
and validation grids too large to hold. Each ends in one line (no traceback), a counted skip, or
the right result, before anything heavy loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def argparse_line(argv, capsys):
    """The one line a refusal of train.parse_args ends in (argparse's, exit 2)."""
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def cli(*argv, cwd=ROOT):
    """python train.py ARGV as a user runs it: (exit code, stdout + stderr)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------
# 1. Flags: sizes that exhaust memory, a log folder outside --out_dir

@pytest.mark.parametrize("flags, message", [
    (["--resolution", "8192"], "--resolution must be at most 4096 (each image is held and rendered at that size), "
                               "not 8192"),
    (["--num_items", "2147483647"], "--num_items must be at most 10000000 (an epoch's order is held in memory), "
                                    "not 2147483647"),
    (["--report_to", "tensorboard", "--logging_dir", "/tmp/elsewhere"],
     "--logging_dir '/tmp/elsewhere': name a folder inside --out_dir (e.g. logs); a run writes only there"),
    (["--report_to", "tensorboard", "--logging_dir", "a/../../up"],
     "--logging_dir 'a/../../up': name a folder inside --out_dir (e.g. logs); a run writes only there"),
    (["--report_to", "tensorboard", "--logging_dir", ""],
     "--logging_dir '': name a folder inside --out_dir (e.g. logs); a run writes only there"),
])
def test_sizes_and_log_folders_refused_before_anything_loads(flags, message, capsys):
    # Before: --resolution 100000 died in render_toy (MemoryError traceback, 149 GiB), --num_items 2**31-1 in
    # torch.randperm (16 GiB), both after the models loaded; --logging_dir /abs or ../x wrote TensorBoard's
    # files outside --out_dir.
    assert argparse_line(FAST + flags, capsys).endswith(f": error: {message}")  # (argparse names the program)


def test_log_folders_inside_out_dir_and_unused_ones_are_accepted():
    train.parse_args(["--report_to", "tensorboard", "--logging_dir", "tb/run1", *FAST])
    train.parse_args(["--logging_dir", "/not/used/without/tensorboard", *FAST])
    train.parse_args([*FAST, "--resolution", "4096", "--num_items", "10000000"])
