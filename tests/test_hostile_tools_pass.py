"""Hostile input to sample.py, evaluate.py and the command-line tools, a class each: text files that
are valid UTF-8 but not text (UTF-16 without its BOM), --overwrite with another input wrong (the
earlier output must survive), an --out no folder can be made in, --compare naming --out, files an
evaluate.py --out would replace, sample folders that list one image twice, a toy scorer cache that
is not one, tools.to_safetensors' output, tools.same_runs' record, tools.build_cache's input and
--overwrite, tools.hpdv2_to_parquet's --overwrite. Each ends in one line `error: ...` (no
traceback) or the right result, with the user's files as they were."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import evaluate as E
import sample as S
from plumbing import files
from test_hostile_cli import main_error, sample_folder
from test_hostile_third_pass import one_line

FAST = ["--model", "tiny", "--steps", "2", "--seeds", "0", "--prompts", "a red circle on a blue background"]


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------
# Text that is UTF-8 but not text


@pytest.mark.parametrize("content", ["a cat\na dog\n".encode("utf-16-le"), b"\0\0\0", b"a cat\n\0\n"])
def test_a_prompts_file_holding_nul_bytes_is_refused(tmp_path, content):
    """UTF-16 without a BOM is valid UTF-8 (every other byte 0): it was sampled as prompts "a\\0 \\0c..."."""
    (tmp_path / "p.txt").write_bytes(content)
    line = main_error(S.main, [*FAST[:6], "--prompts", tmp_path / "p.txt", "--out", tmp_path / "out"])
    assert line.startswith(f"error: {tmp_path / 'p.txt'}:") and "NUL byte" in line and "UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_a_samples_index_in_utf16_is_refused(tmp_path):
    folder = sample_folder(str(tmp_path / "s"))
    index = os.path.join(folder, "samples.jsonl")
    with open(index, "rb") as f:
        raw = f.read()
    with open(index, "wb") as f:
        f.write(raw.decode().encode("utf-16-le"))
    assert "NUL byte" in one_line(files.read_index, folder)


# ---------------------------------------------------------------------------------------
# sample.py --out


@pytest.fixture
def earlier(tmp_path):
    """An earlier sample.py output."""
    S.main([*FAST, "--out", str(tmp_path / "earlier")])
    return tmp_path / "earlier"


@pytest.mark.parametrize("bad", [["--unet", "nothere/unet"], ["--lora", "nothere"], ["--compare", "nothere"]])
def test_overwrite_keeps_the_earlier_samples_when_another_input_is_wrong(tmp_path, earlier, bad):
    """--overwrite deleted the earlier images at the flag checks, then --unet, --lora or --compare
    failed: the images were lost and nothing replaced them."""
    before = folder_bytes(earlier)
    bad = [bad[0], str(tmp_path / bad[1])]
    line = main_error(S.main, [*FAST, *bad, "--out", earlier, "--overwrite"])
    assert line.startswith("error: ") and "nothere" in line
    assert folder_bytes(earlier) == before


def test_overwrite_still_replaces_the_earlier_samples(tmp_path, earlier):
    (earlier / "0007_seed3.png").write_bytes((earlier / "0000_seed0.png").read_bytes())  # one of its own names
    S.main([*FAST, "--out", str(earlier), "--overwrite"])
    assert sorted(os.listdir(earlier)) == ["0000_seed0.png", "grid.png", "samples.jsonl"]


def test_compare_naming_the_out_that_overwrite_empties_is_refused(tmp_path, earlier):
    """It was emptied at the checks, then refused as having no samples.jsonl: the images were lost."""
    before = folder_bytes(earlier)
    line = main_error(S.main, [*FAST, "--out", earlier, "--overwrite", "--compare", f"{earlier}/"])
    assert line == f"error: --compare {earlier}/ is --out, whose images --overwrite deletes: compare with another folder"
    assert folder_bytes(earlier) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_out_no_folder_can_be_made_in_is_refused_before_loading(tmp_path):
    """As root os.access says /proc is writable: sample.py loaded the models, then said 'free space'."""
    line = main_error(S.main, [*FAST, "--out", "/proc/no-such-run/out"])
    assert line.startswith("error: --out /proc/no-such-run/out: no folder can be made in /proc (")


def test_a_write_error_that_is_not_a_full_disk_is_not_called_one():
    from plumbing import sample_out
    assert "free space" in sample_out.write_failed("out", OSError(28, "No space left on device"))
    line = sample_out.write_failed("out", PermissionError(13, "Permission denied", "out/samples.jsonl"))
    assert line == "error: cannot write in out: Permission denied (out/samples.jsonl)"
