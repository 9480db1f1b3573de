"""toy/experiment.py end to end at toy scale (a few steps each): every code path, the table maths
against the per-seed numbers, the outputs, and that a rerun reuses every cached piece."""
import json
import os

import pytest
from PIL import Image

from plumbing import tiny

import evaluate
from toy import experiment
import train

FAST = ["--study", "smoke", "--base_steps", "4", "--align_steps", "4", "--curve_every", "2", "--sample_steps", "2",
        "--sample_seeds", "1"]


train_main, score_unet = train.main, experiment.score_unet


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
    run, = (tmp_path / "align" / "dpo").glob("lr1e-06-seed0-*")  # (named by what made it)
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

    # a changed sampling setting is scored anew, never answered from the cache (and the curve runs,
    # whose validation used it, are retrained); from another base, every run is retrained
    calls = {"train": 0, "score": 0}

    def count(what, fn):
        def counted(*a, **k):
            calls[what] += 1
            return fn(*a, **k)
        return counted

    monkeypatch.setattr(train, "main", count("train", train_main))
    monkeypatch.setattr(experiment, "score_unet", count("score", score_unet))
    runs = len(study["variants"]) * len(study["lrs"]) * len(study["seeds"])
    experiment.main(FAST + ["--runs", str(tmp_path), "--sample_steps", "3"])
    assert calls == {"train": len(study["variants"]), "score": len(study["seeds"]) + runs}
    monkeypatch.setattr(experiment, "base_id", lambda base_dir: "another")
    calls.update(train=0, score=0)
    experiment.main(FAST + ["--runs", str(tmp_path), "--sample_steps", "3"])
    # (retrained from the same weights: the same bytes, so their scores are the ones just made)
    assert calls == {"train": runs, "score": 0}


def test_the_shipped_base_is_the_recipes_and_fits_todays_frozen_text_encoder():
    """results/toy-study/base is what BASE_ARGS trains on a CPU, conditioned on the text encoder the
    tiny preset builds today: a change to either (recipe, tokenizer, text encoder) fails here, not
    silently in the demo."""
    import transformers
    from safetensors.torch import load_file

    unet = tiny.build_tiny(False, False)["unet"]
    for style in ("winter", "sketch"):  # (the winter base, and the sketch base of the sketch runs)
        shipped = experiment.shipped_base(style)
        assert json.load(open(f"{shipped}/recipe.json")) == experiment.with_style(experiment.BASE_ARGS, style) + [
            "--device", "cpu"]
        weights = load_file(f"{shipped}/unet/diffusion_pytorch_model.safetensors")
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 initialises the frozen CLIP otherwise: there the demo pretrains its own base")
    for style in ("winter", "sketch"):
        assert open(f"{experiment.shipped_base(style)}/fingerprint.txt").read().strip() == experiment.frozen_fingerprint()


def test_pretrain_base_copies_a_fitting_shipped_base_and_trains_otherwise(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(argv):  # what train.main leaves: the UNet folder
        out = argv[argv.index("--out_dir") + 1]
        (tmp_path / out).joinpath("unet").mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "unet" / "weights").write_text("trained")
        trained.append(argv)

    monkeypatch.setattr(train, "main", fake_train)
    shipped = tmp_path / "shipped"
    (shipped / "unet").mkdir(parents=True)
    (shipped / "unet" / "weights").write_text("shipped")
    recipe = experiment.with_steps(experiment.BASE_ARGS, 4) + ["--device", "cpu"]
    json.dump(recipe, open(shipped / "recipe.json", "w"))
    (shipped / "fingerprint.txt").write_text(experiment.frozen_fingerprint() + "\n")
    base = tmp_path / "runs" / "base"

    experiment.pretrain_base(str(base), "cpu", 4, shipped=str(shipped))  # fits: copied, nothing trained
    assert trained == [] and (base / "unet" / "weights").read_text() == "shipped"
    assert json.load(open(base / "recipe.json")) == recipe and "the shipped one" in capsys.readouterr().out
    experiment.pretrain_base(str(base), "cpu", 4, shipped=str(shipped))  # rerun: the cache
    assert trained == [] and "cached" in capsys.readouterr().out
    experiment.pretrain_base(str(base), "cpu", 4, shipped=None)  # --pretrain: the copy won't do
    assert len(trained) == 1 and (base / "unet" / "weights").read_text() == "trained"
    assert not (base / "shipped").exists()
    experiment.pretrain_base(str(base), "cpu", 4, shipped=None)  # ... and its own result is then the cache
    assert len(trained) == 1

    other = tmp_path / "runs2" / "base"
    experiment.pretrain_base(str(other), "cpu", 5, shipped=str(shipped))  # another recipe: trained, quietly
    assert len(trained) == 2 and "frozen text-encoder" not in capsys.readouterr().out
    (shipped / "fingerprint.txt").write_text("0" * 64)
    third = tmp_path / "runs3" / "base"
    experiment.pretrain_base(str(third), "cpu", 4, shipped=str(shipped))  # other frozen parts: trained, and says why
    assert len(trained) == 3 and "other frozen text-encoder weights" in capsys.readouterr().out


def test_variants_from_the_command_line_one_seed_many_lrs(tmp_path, monkeypatch, capsys):
    """--variant NAME='TRAIN FLAGS' × --lrs × --seeds, one seed and two lrs (which crashed the summary
    once): results.json has one row per run with its full train.py command and the scorer's identity;
    a rerun reuses the runs and says so; a changed command or changed code retrains."""
    fast = ["--base_steps", "4", "--align_steps", "3", "--sample_steps", "2", "--sample_seeds", "1",
            "--runs", str(tmp_path), "--out", str(tmp_path / "mine")]
    variants = ["--variant", "dpo=--loss dpo", "--variant", "rpo text=--loss rpo --embed text"]
    experiment.main(fast + variants + ["--lrs", "1e-6,3e-6", "--seeds", "0"])
    results = json.load(open(tmp_path / "mine" / "results.json"))
    assert [(r["variant"], r["lr"], r["seed"]) for r in results["runs"]] == [
        ("dpo", 1e-6, 0), ("dpo", 3e-6, 0), ("rpo text", 1e-6, 0), ("rpo text", 3e-6, 0)]
    for r in results["runs"]:
        assert r["command"].startswith("python train.py --model tiny") and "--lr" in r["command"]
        assert 0 <= r["style"] <= 1 and 0 <= r["content"] <= 1 and r["scorer"].startswith("toy-scorer winter")
    assert "--embed text" in results["runs"][2]["command"] and (tmp_path / "mine" / "tradeoff.png").exists()
    capsys.readouterr()
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("retrained"))
    experiment.main(fast + variants + ["--lrs", "1e-6,3e-6", "--seeds", "0"])
    out = capsys.readouterr().out
    assert out.count("reused run") == 4 and "4 of 4 runs and 5 of 5 scores reused" in out


def scores(path):
    return [(r["variant"], r["lr"], r["seed"], r["style"], r["content"]) for r in json.load(open(path))["runs"]]


def test_a_changed_variant_or_code_is_never_answered_by_the_old_model(tmp_path, monkeypatch):
    """The same variant name with other flags, or after an edit to the code, gives the rows a fresh
    --runs folder gives (never the old model's scores beside the new command); the old run is kept."""
    fast = ["--base_steps", "4", "--sample_steps", "2", "--sample_seeds", "1", "--lrs", "1e-3", "--seeds", "0"]
    a, fresh = ["--runs", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "out")], str(tmp_path / "fresh")
    experiment.main(fast + a + ["--variant", "m=--loss sft --max_steps 1"])
    old = scores(tmp_path / "a" / "out" / "results.json")
    experiment.main(fast + a + ["--variant", "m=--loss sft --max_steps 4"])
    experiment.main(fast + ["--runs", fresh, "--out", fresh + "/out", "--variant", "m=--loss sft --max_steps 4"])
    new = scores(tmp_path / "a" / "out" / "results.json")
    assert new == scores(fresh + "/out/results.json") and len(list((tmp_path / "a" / "align" / "m").iterdir())) == 2
    assert "--max_steps 4" in json.load(open(tmp_path / "a" / "out" / "results.json"))["runs"][0]["command"]

    # a code edit that changes what a run computes (here: SFT's loss × 50), seen by code_id
    import loss
    sft = loss.OBJECTIVES["sft"]["fn"]
    monkeypatch.setitem(loss.OBJECTIVES["sft"], "fn", lambda err_w: (50 * sft(err_w)[0], sft(err_w)[1]))
    monkeypatch.setattr(experiment, "code_id", lambda: "edited")
    experiment.main(fast + a + ["--variant", "m=--loss sft --max_steps 4"])
    experiment.main(fast + ["--runs", fresh + "2", "--out", fresh + "2/out", "--variant", "m=--loss sft --max_steps 4"])
    edited = scores(tmp_path / "a" / "out" / "results.json")
    assert edited == scores(fresh + "2/out/results.json")
    weights = [experiment.weights_id(str(p / "unet")) for p in (tmp_path / "a" / "align" / "m").iterdir()]
    assert len(set(weights)) == 3  # three models, each scored as itself
    assert old != new or old != edited  # (the toy scores at these sizes may coincide; the weights do not)


def test_code_id_ignores_comments_and_docstrings_only(tmp_path):
    import shutil
    root = tmp_path / "repo"
    for folder in ("plumbing", "toy"):
        (root / folder).mkdir(parents=True)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (root / "toy" / "experiment.py").write_text("")
    for name in ("loss.py", "plumbing/files.py", "toy/__init__.py", "toy/clip.py"):
        shutil.copy(os.path.join(here, name), root / name)
    first = experiment.code_id.__wrapped__(str(root))
    text = (root / "loss.py").read_text()
    (root / "loss.py").write_text(text.replace('"""', '"""A new sentence. ', 1).replace("# E1", "# E1 (edited)"))
    assert experiment.code_id.__wrapped__(str(root)) == first
    (root / "loss.py").write_text(text.replace("beta=5000.0", "beta=5001.0", 1))
    assert experiment.code_id.__wrapped__(str(root)) != first


def test_data_id_follows_the_data(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"prompt": "a", "winner": "w.png", "loser": "l.png"}\n')
    first = experiment.data_id(["--data", str(manifest)])
    assert experiment.data_id(["--data", str(manifest)]) == first
    manifest.write_text('{"prompt": "b", "winner": "w.png", "loser": "l.png"}\n')
    assert experiment.data_id(["--data", str(manifest)]) != first
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-0.parquet").write_bytes(b"x")
    folder = experiment.data_id(["--data", f"hf:{tmp_path / 'shards'}#pickapic"])
    (tmp_path / "shards" / "train-1.parquet").write_bytes(b"y")
    assert experiment.data_id(["--data", f"hf:{tmp_path / 'shards'}#pickapic"]) != folder
    assert experiment.data_id(["--loss", "dpo"]) == "toy"  # (the toy sets: made by the hashed code)


@pytest.mark.parametrize("argv, needle", [
    (["--variant", "nameonly"], "NAME='TRAIN FLAGS'"),
    (["--variant", "x=--loss nope"], "train.py does not take"),
    (["--variant", "x=--loss dpo", "--lrs", "fast"], "comma lists"),
    (["--lrs", "1e-6"], "go with --variant"),
])
def test_variant_mistakes_stop_before_any_work(argv, needle, capsys):
    with pytest.raises(SystemExit):
        experiment.parse_args(argv)
    assert needle in capsys.readouterr().err
