"""evaluate.py: the toy scorer and its accuracy gate, table maths, the CLI end to end, plots."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from plumbing.images import image_to_tensor
from plumbing.images import apply_style, render_toy, toy_prompts
import evaluate as E


from plumbing import plots
from plumbing import toy_scorer
@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """Train once per test session into a fresh cache (~10 s on one CPU core)."""
    cache = str(tmp_path_factory.mktemp("scorer") / "toy_scorer.safetensors")
    net, acc = toy_scorer.load_toy_scorer("winter", 16, cache=cache, seed=0, shipped=None)
    return net, acc, cache


def renders(prompts, per_prompt, styled, seed):
    rng = np.random.default_rng(seed)
    imgs, out_prompts = [], []
    for p in prompts:
        for _ in range(per_prompt):
            img = render_toy(p, 16, rng)
            imgs.append(apply_style(img, "winter", rng) if styled else img)
            out_prompts.append(p)
    return np.stack(imgs), out_prompts


def test_scorer_is_accurate_on_heldout_renders_and_unseen_prompts(scorer):
    net, acc, _ = scorer
    assert set(acc) == {"style", "shape", "colour", "background"}
    assert all(v >= 0.95 for v in acc.values()), acc
    test_prompts = toy_prompts("test")  # combinations the diffusion model never trained on
    plain, prompts = renders(test_prompts, 20, styled=False, seed=123)
    styled, _ = renders(test_prompts, 20, styled=True, seed=456)
    s_plain, s_styled = toy_scorer.score_toy(net, plain, prompts), toy_scorer.score_toy(net, styled, prompts)
    assert (s_styled["style"] > 0.5).float().mean() >= 0.95
    assert (s_plain["style"] < 0.5).float().mean() >= 0.95
    assert s_plain["content"].mean() >= 0.95 and s_styled["content"].mean() >= 0.95
    # float input in [-1, 1] and uint8 input give the same scores
    as_float = torch.stack([image_to_tensor(im) for im in styled])
    assert torch.equal(toy_scorer.score_toy(net, as_float, prompts)["content"], s_styled["content"])
    # content really compares against the prompt: the same images under a wrong colour fail
    wrong = [p.replace(p.split()[1], "green" if p.split()[1] != "green" else "red") for p in prompts]
    assert toy_scorer.score_toy(net, plain, wrong)["content"].mean() <= 0.05


def test_accuracy_gate_stops_a_weak_scorer(scorer, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="0.95"):
        toy_scorer.check_accuracy({"style": 0.99, "shape": 0.9, "colour": 1.0, "background": 1.0})
    toy_scorer.check_accuracy({"style": 0.95, "shape": 0.99, "colour": 1.0, "background": 1.0})  # passes
    # and load_toy_scorer really applies it (on a cached scorer whose accuracy is faked low)
    monkeypatch.setattr(toy_scorer, "heldout_accuracy", lambda *a: {"style": 0.9, "shape": 1.0})
    with pytest.raises(SystemExit, match=r"style=0\.900 < 0\.95"):
        toy_scorer.load_toy_scorer("winter", 16, cache=scorer[2], seed=0, shipped=None)


def test_scorer_cache_is_reused_and_keyed_on_config(scorer, monkeypatch):
    net, acc, cache = scorer
    mtime = os.path.getmtime(cache)
    meta = json.load(open(os.path.splitext(cache)[0] + ".json"))
    assert meta["accuracy"] == acc and meta["config"]["seed"] == 0

    def no_training(*a):
        raise AssertionError("retrained")
    monkeypatch.setattr(toy_scorer, "train_toy_scorer", no_training)
    net2, acc2 = toy_scorer.load_toy_scorer("winter", 16, cache=cache, seed=0, shipped=None)
    assert os.path.getmtime(cache) == mtime and acc2 == acc
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k]) and torch.equal(v, load_file(cache)[k])
    with pytest.raises(AssertionError, match="retrained"):  # another seed must not reuse it
        toy_scorer.load_toy_scorer("winter", 16, cache=cache, seed=1, shipped=None)


def test_summarize_and_markdown_table():
    mean, std = E.summarize([0.2, 0.4, 0.6])
    assert abs(mean - 0.4) < 1e-9 and abs(std - 0.2) < 1e-9
    assert E.summarize([0.7]) == (0.7, 0.0)
    rows = [{"model": "dpo lr=1e-5", "style": (0.52, 0.03), "content": (0.8, 0.02)},
            {"model": "base", "style": (0.1, 0.0), "content": (0.9995, 0.0)}]
    assert E.markdown_table(rows, ["model", "style", "content"]) == (
        "| model | style | content |\n"
        "|---|---|---|\n"
        "| dpo lr=1e-5 | 0.520 ± 0.030 | 0.800 ± 0.020 |\n"
        "| base | 0.100 ± 0.000 | 1.000 ± 0.000 |\n")


def write_sample_folder(folder, styled_flags, seeds):
    """Fake sample.py output: renders of test prompts, styled where styled_flags says."""
    os.makedirs(folder, exist_ok=True)
    rng, prompts = np.random.default_rng(7), toy_prompts("test")
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        for i, (styled, seed) in enumerate(zip(styled_flags, seeds)):
            prompt = prompts[i % len(prompts)]
            img = render_toy(prompt, 32, rng)  # 32 px: evaluate must box-resize it to 16
            img = apply_style(img, "winter", rng) if styled else img
            Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"))
            f.write(json.dumps({"prompt": prompt, "seed": seed, "file": f"{i:03d}.png", "model": "fake"}) + "\n")


def test_cli_scores_folders_per_seed(scorer, tmp_path, capsys):
    # seed 0: 9 of 12 styled (0.75); seed 1: 3 of 12 styled (0.25) -> mean 0.5, std 0.3536
    flags = [i % 4 != 0 for i in range(12)] + [i % 4 == 0 for i in range(12)]
    write_sample_folder(tmp_path / "a", flags, [0] * 12 + [1] * 12)
    write_sample_folder(tmp_path / "b", [False] * 6, [3] * 6)
    out = tmp_path / "results.json"
    E.main(["--images", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "rpo,base",
            "--scorer_cache", scorer[2], "--out", str(out)])  # default --metrics toy_style,toy_content
    res = json.load(open(out))
    a, b = res["runs"]
    assert a["label"] == "rpo" and a["n_images"] == 24 and b["n_images"] == 6
    style = a["metrics"]["toy_style"]
    assert style["per_seed"]["0"] == pytest.approx(0.75, abs=0.03)
    assert style["per_seed"]["1"] == pytest.approx(0.25, abs=0.03)
    assert style["mean"] == pytest.approx(0.5, abs=0.03)
    assert style["std"] == pytest.approx(np.std([0.75, 0.25], ddof=1), abs=0.03)
    assert a["metrics"]["toy_content"]["mean"] >= 0.95 and b["metrics"]["toy_style"]["mean"] < 0.05
    assert b["metrics"]["toy_style"]["std"] == 0.0 and res["scorer_accuracy"] == scorer[1]
    table = capsys.readouterr().out
    assert table.startswith("| model | images | toy_style | toy_content |")
    assert "| rpo | 24 | 0.5" in table and "| base | 6 | 0.0" in table


def test_cli_rejects_bad_folders(scorer, tmp_path):
    empty = tmp_path / "not_samples"
    empty.mkdir()
    with pytest.raises(SystemExit, match="not_samples: no samples.jsonl") as e:
        E.main(["--images", str(empty), "--scorer_cache", scorer[2]])
    assert "\n" not in str(e.value)
    write_sample_folder(tmp_path / "s", [True, False], [0, 0])
    os.remove(tmp_path / "s" / "001.png")
    with pytest.raises(SystemExit, match="001.png is missing"):
        E.main(["--images", str(tmp_path / "s"), "--scorer_cache", scorer[2], "--out", str(tmp_path / "r.json")])


def test_plots_write_pngs_of_the_expected_size(tmp_path):
    for name, has_acc in (("rpo", True), ("sft", False)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step in range(1, 31):
                rec = {"step": step, "loss": 0.69 - 0.01 * step, "lr": 1e-5}
                if has_acc:
                    rec["implicit_acc"] = min(1.0, step / 20)
                f.write(json.dumps(rec) + "\n")
    curves = tmp_path / "curves.png"
    E.main(["--curves", f"rpo={tmp_path / 'rpo'}", f"sft={tmp_path / 'sft'}", "--out", str(curves)])
    assert Image.open(curves).size == (1500, 400)
    plots.plot_curves({"rpo": str(tmp_path / "rpo")}, str(tmp_path / "c2.png"), {"rpo": [(10, 0.2), (30, 0.6)]})
    assert Image.open(tmp_path / "c2.png").size == (1500, 400)
    pts = {"rpo": [(1e-5, 0.6, 0.05, 0.9, 0.02), (1e-6, 0.3, 0.04, 0.97, 0.01)],
           "dpo": [(1e-5, 0.5, 0.05, 0.85, 0.03)]}
    plots.plot_tradeoff(pts, str(tmp_path / "trade.png"))
    assert Image.open(tmp_path / "trade.png").size == (600, 500)
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plots.plot_curves({"x": str(tmp_path)}, str(tmp_path / "x.png"))
