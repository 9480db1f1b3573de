"""experiment.py end to end at toy scale (a few steps each): every code path, the table maths
against the per-seed numbers, the outputs, and that a rerun reuses every cached piece."""
import json

import pytest
from PIL import Image

import evaluate
import experiment
import train

FAST = ["--study", "smoke", "--base_steps", "4", "--align_steps", "4", "--curve_every", "2", "--sample_steps", "2",
        "--sample_seeds", "1"]


def test_smoke_study_writes_consistent_results_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    experiment.main(FAST + ["--runs", str(tmp_path)])
    out = tmp_path / "smoke"
    results = json.load(open(out / "results.json"))
    study = experiment.STUDIES["smoke"]
    rows = results["rows"]
    assert [r["model"] for r in rows] == ["base"] + [v for v in study["variants"] for _ in study["lrs"]]
    for row in rows:
        assert len(row["per_seed"]) == len(study["seeds"])
        for metric in ("style", "content"):
            mean, std = evaluate.summarize([s[metric] for s in row["per_seed"]])
            assert row[metric] == pytest.approx([mean, std])
            assert 0.0 <= mean <= 1.0
    table = open(out / "results.md").read()
    assert table.splitlines()[0] == "| model | style | content |" and len(table.splitlines()) == 2 + len(rows)
    # grid: base + one row per variant, the 12 held-out prompts, 16 px images at scale 4
    assert Image.open(out / "grid.png").size == (12 * 16 * 4, (1 + len(study["variants"])) * 16 * 4)
    assert (out / "curves.png").exists() and (out / "tradeoff.png").exists()
    # style over steps for the curves: train.py's validation scores of the curve run (first seed,
    # middle lr), every --curve_every steps; the last one is the run's final score (same prompts,
    # sampling seeds, sampler and scorer)
    run = tmp_path / "align" / "dpo" / "steps4" / "lr1e-06" / "seed0"  # (keyed by steps: no reuse across them)
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in log if "val_toy_style" in r] == [2, 4]
    final = next(r for r in rows if r["model"] == "dpo" and r["lr"] == 1e-6)["per_seed"][0]
    assert (log[-1]["val_toy_style"], log[-1]["val_toy_content"]) == pytest.approx((final["style"], final["content"]))

    # a rerun trains nothing and scores nothing: everything comes from the caches
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(experiment, "score_unet", lambda *a, **k: pytest.fail("rescored"))
    capsys.readouterr()
    experiment.main(FAST + ["--runs", str(tmp_path)])
    assert "base: cached" in capsys.readouterr().out
    assert json.load(open(out / "results.json"))["rows"] == rows
