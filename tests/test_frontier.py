"""toy/frontier.py's analysis on hand-made numbers (the study itself takes hours: results/toy-study/)."""
import math
import os

import pytest

from toy import frontier as F


def test_content_at_interpolates_where_the_lr_path_first_crosses_the_style():
    pts = [(1e-6, 0.40, 0.30), (3e-7, 0.35, 0.32), (3e-6, 0.60, 0.20), (1e-5, 0.90, 0.05)]  # unsorted on purpose
    assert F.content_at(pts, 0.5) == pytest.approx(0.30 + (0.20 - 0.30) * (0.5 - 0.40) / (0.60 - 0.40))  # 0.25
    assert F.content_at(pts, 0.75) == pytest.approx(0.20 + (0.05 - 0.20) * 0.5)  # 0.125
    assert F.content_at(pts, 0.95) is None and F.content_at(pts, 0.2) is None  # never crossed


def test_mean_ci_is_a_t_interval_over_seeds():
    m, ci = F.mean_ci([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and ci == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert F.mean_ci([0.5]) == (0.5, None) and F.mean_ci([]) == (None, None)


def test_matched_pairs_rpo_and_dpo_by_seed():
    table = [{"variant": v, "batch": 8, "style_name": "winter", "seed": s, "lr": lr, "style": st, "content": c}
             for v, shift in (("dpo", 0.0), ("rpo τ=0.5", 0.05)) for s in (0, 1)
             for lr, st, c in ((1e-7, 0.4, 0.3), (1e-6, 0.8, 0.1 + shift))]
    assert F.matched(table, "dpo", 0.6) == {0: pytest.approx(0.2), 1: pytest.approx(0.2)}
    assert F.matched(table, "rpo τ=0.5", 0.6) == {0: pytest.approx(0.225), 1: pytest.approx(0.225)}
    assert "+0.025" in F.analysis(table)


def test_the_job_list_is_unique_and_puts_seed_0_first():
    jobs = F.jobs()
    assert len(jobs) == len(set(jobs)) == 380
    first_other = next(i for i, j in enumerate(jobs) if j[2] != 0)
    assert all(j[2] == 0 and j[3] == 8 and j[4] == "winter" for j in jobs[:first_other])
    assert {j[0] for j in jobs[:first_other]} == set(F.VARIANTS)


def test_lrs_adds_the_8_per_decade_midpoints_inside_the_transition_only():
    assert F.grid(1e-7, 3) == [1e-7, 1.8e-7, 3.2e-7]
    assert F.lrs(1e-7, 4, (1.8e-7, 5.6e-7, 8)) == [1e-7, 1.8e-7, 2.4e-7, 3.2e-7, 4.2e-7, 5.6e-7]  # 1e-7·10^(3/8), ^(5/8)
    assert F.lrs(1e-7, 4) == F.grid(1e-7, 4)
    assert F.lrs(1e-7, 4, (1e-7, 5.6e-7, 8), (1.8e-7, 3.2e-7, 16)) == [1e-7, 1.3e-7, 1.8e-7, 2.1e-7, 2.4e-7, 2.7e-7,
                                                                      3.2e-7, 4.2e-7, 5.6e-7]  # 1e-7·10^(5/16)...
    for v, (_, _, lrs, other) in F.VARIANTS.items():  # the other seeds: seed 0's grid from some lr on
        assert lrs == sorted(set(lrs)) and set(other) <= set(lrs), v
        assert other == [x for x in lrs if x >= other[0]] or v == "rpo τ=0.1", v  # (τ 0.1: without the midpoints)


def test_span_counts_the_grid_points_between_no_change_and_collapse():
    base = {"style": 0.35, "content": 0.32}
    pts = [(1e-7, 0.36, 0.32), (2e-7, 0.44, 0.30),  # unchanged: style < 0.45, content > 0.27
           (3e-7, 0.50, 0.30), (4e-7, 0.60, 0.20), (5e-7, 0.80, 0.06), (6e-7, 0.95, 0.05), (7e-7, 0.9, 0.0)]
    assert F.span(pts, base) == (2e-7, 6e-7, 3)
    assert F.span(pts[:5], base) == (2e-7, None, None)  # never collapses
    assert F.span(pts[2:], base) == (None, None, None)  # no unchanged point to start from
    assert F.span([(1e-7, 0.36, 0.32), (2e-7, 0.40, 0.02)], base) == (1e-7, 2e-7, 0)  # content gone at once


def test_the_demo_runs_each_method_at_the_frontiers_first_lr_reaching_style_0_7():
    import json
    import os

    from toy import experiment
    path = os.path.join(os.path.dirname(__file__), "..", "results", "toy-study", "frontier.json")
    rows = [r for r in json.load(open(path))["rows"] if r["seed"] == 0 and r["batch"] == 8 and r["style_name"] == "winter"]
    demo = experiment.STUDIES["demo"]
    assert demo["steps"] == F.STEPS and demo["sample_seeds"] == F.SAMPLE_SEEDS
    for v, (lr,) in demo["lrs"].items():
        assert lr == min(r["lr"] for r in rows if r["variant"] == v and r["style"] >= 0.7), v


def test_the_committed_demo_table_is_the_factorials_seed_0_points():
    """Same base (the shipped one), recipe, scorer and sampling seeds: the demo's DPO and RPO rows are
    the factorial's seed-0 points of their defaults (DPO one t per pair, RPO outside one t per
    micro-batch) at the demo's lrs, and its base row the factorial's base on seed 0's sampling seeds."""
    import json
    import os

    results = os.path.join(os.path.dirname(__file__), "..", "results", "toy-study")
    factorial = json.load(open(os.path.join(results, "factorial.json")))
    demo = json.load(open(os.path.join(results, "demo", "results.json")))
    base = next(b for b in factorial["base"] if b["style_name"] == "winter" and b["seed"] == 0)
    assert demo["rows"][0]["per_seed"] == [{"style": base["style"], "content": base["content"]}]
    for model, arm in (("dpo", "dpo t=pair"), ("rpo τ=0.5", "rpo outside t=batch")):
        row = next(r for r in demo["rows"] if r["model"] == model)
        point = next(r for r in factorial["rows"] if (r["variant"], r["lr"], r["seed"], r["style_name"])
                     == (arm, row["lr"], 0, "winter"))
        assert row["per_seed"] == [{"style": point["style"], "content": point["content"]}], model


def fake_train(seen):
    """A stand-in for train.main that leaves what a run leaves for the study: OUT_DIR/unet's weights
    (bytes that depend on the command, so another command is another model)."""
    def run(argv):
        seen.append(argv)
        unet = os.path.join(argv[argv.index("--out_dir") + 1], "unet")
        os.makedirs(unet, exist_ok=True)
        open(os.path.join(unet, "diffusion_pytorch_model.safetensors"), "w").write(" ".join(argv))
        open(os.path.join(unet, "config.json"), "w").write("{}")
    return run


def test_variants_from_the_command_line(monkeypatch, tmp_path):
    """--variant NAME='TRAIN FLAGS' × --lrs × --seeds are the frontier's jobs, trained with those
    flags into folders named by what made them; a score belongs to the weights it scored."""
    monkeypatch.setattr(F, "VARIANTS", dict(F.VARIANTS))
    monkeypatch.setattr(F, "CUSTOM", {})
    args = F.parse_args(["--variant", "top=--loss rpo --tau 0.2", "--lrs", "1e-6,2e-6", "--seeds", "0,1",
                         "--runs", str(tmp_path)])
    assert F.jobs() == [("top", 1e-6, 0, 8, "winter"), ("top", 2e-6, 0, 8, "winter"),
                        ("top", 1e-6, 1, 8, "winter"), ("top", 2e-6, 1, 8, "winter")]
    seen, scored = [], []
    (tmp_path / "base" / "unet").mkdir(parents=True)
    (tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors").write_text("base")
    monkeypatch.setattr(F, "pretrained_base", lambda a, style: str(tmp_path / "base"))
    monkeypatch.setattr(F.train, "main", fake_train(seen))
    monkeypatch.setattr(F.E, "score_unet", lambda unet, *a, **k: scored.append(unet) or {"style": 0.5, "content": 0.5})
    monkeypatch.setattr(F, "scorer", lambda *a: None)
    assert F.run_job(args, {}, "top", 1e-6, 0, 8, "winter")
    assert "--tau" in seen[0] and seen[0][seen[0].index("--tau") + 1] == "0.2"
    assert [r["variant"] for r in F.rows(args)] == ["top"] and len(scored) == 1
    assert not F.run_job(args, {}, "top", 1e-6, 0, 8, "winter")  # done: neither trained nor scored again
    assert len(seen) == 1 and len(scored) == 1
    first = F.job(args.runs, args.device, "top", 1e-6, 0, 8, "winter")[0]
    # the same name with other flags: another folder, trained and scored anew; the first run is kept
    F.VARIANTS["top"] = (["--loss", "rpo", "--tau", "0.3"],) + F.VARIANTS["top"][1:]
    other = F.job(args.runs, args.device, "top", 1e-6, 0, 8, "winter")[0]
    assert other != first and F.rows(args, [("top", 1e-6, 0, 8, "winter")]) == []  # (not answered by the old run)
    assert F.run_job(args, {}, "top", 1e-6, 0, 8, "winter") and len(seen) == 2 and len(scored) == 2
    assert os.path.exists(os.path.join(first, "run", "unet"))
    # other code: another folder too
    monkeypatch.setattr(F.E, "code_id", lambda: "edited")
    assert F.job(args.runs, args.device, "top", 1e-6, 0, 8, "winter")[0] not in (first, other)
    with pytest.raises(SystemExit):
        F.parse_args(["--lrs", "1e-6"])


def test_analysis_and_plot_of_command_line_variants(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "VARIANTS", dict(F.VARIANTS))
    monkeypatch.setattr(F, "CUSTOM", {})
    F.parse_args(["--variant", "dpo=--loss dpo", "--variant", "top=--loss rpo --tau 0.2", "--lrs", "1e-6,2e-6,4e-6"])
    table = [{"variant": v, **F.ROW_DEFAULTS, **F.VARIANTS[v][1], "batch": 8, "style_name": "winter", "lr": lr,
              "seed": 0, "style": 0.3 + 0.25 * i, "content": 0.4 - 0.1 * i}
             for v in ("dpo", "top") for i, lr in enumerate([1e-6, 2e-6, 4e-6])]
    base = {("winter", 0): {"style": 0.3, "content": 0.4}}
    assert "| top |" in F.analysis(table, base)
    F.plot(table, str(tmp_path / "frontier.png"), base)
    assert (tmp_path / "frontier.png").stat().st_size > 1000
