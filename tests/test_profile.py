"""bench/profile.py (python -m bench.speed profile): every part of a train.py step is timed, the parts
add up to the step, and train.py is left as it was."""
import json

import pytest

from bench import profile
from tools import build_cache


def originals():
    return [obj.__dict__[name] for obj, name, _ in profile.patches(profile.StepParts())]


def test_profile_times_each_part_of_a_raw_step(tmp_path, capsys):
    before = originals()
    row = profile.main(["--model", "tiny-xl", "--batch_size", "2", "--grad_accum", "2", "--max_steps", "4",
                        "--out_dir", str(tmp_path / "run"), "--no_progress", "--profile_warmup", "1",
                        "--profile_out", str(tmp_path / "rows.jsonl")])
    assert originals() == before  # the timers are gone: train.py runs unprofiled again
    assert row["steps_profiled"] == 3 and row["warmup_steps"] == 1
    ms = row["ms"]
    for part in ("data_wait", "vae_encode", "text_encoders", "e5_clip", "policy_fwd", "policy_bwd", "reference_fwd",
                 "optimizer"):
        assert ms[part] > 0, part
    assert ms["cached_inputs"] == 0
    assert ms["other"] >= 0 and sum(ms.values()) == pytest.approx(row["ms_per_step"], abs=0.05)
    assert sum(row["share"].values()) == pytest.approx(1, abs=2e-3)
    assert row["pairs_per_s"] == pytest.approx(4 / (row["ms_per_step"] / 1e3), rel=1e-3)
    assert row["num_workers"] == 0  # (the CPU)
    assert json.loads(open(tmp_path / "rows.jsonl").read()) == row
    assert capsys.readouterr().out.strip().splitlines()[-1] == json.dumps(row)


def test_profile_of_a_cached_step_has_no_encoders(tmp_path):
    build_cache.build_cache("tiny-sd", "toy", str(tmp_path / "cache"), num_items=16, batch_size=8, progress=False)
    parts = profile.profile(["--model", "tiny-sd", "--data", f"cache:{tmp_path / 'cache'}", "--batch_size", "4",
                             "--max_steps", "3", "--out_dir", str(tmp_path / "run"), "--no_progress"], warmup=1)
    assert len(parts.steps) == 2
    for step in parts.steps:
        assert step["cached_inputs"] > 0 and step["policy_fwd"] > 0 and step["reference_fwd"] > 0
        assert step["vae_encode"] == step["text_encoders"] == step["e5_clip"] == 0


def test_profile_refuses_a_run_with_no_step_after_warm_up(tmp_path):
    with pytest.raises(SystemExit, match="raise --max_steps"):
        profile.main(["--model", "tiny", "--max_steps", "1", "--batch_size", "2", "--out_dir", str(tmp_path / "run"),
                      "--no_progress"])
