"""Hostile input to sample.py, evaluate.py and the command-line tools, a class each: text files that
are valid UTF-8 but not text (UTF-16 without its BOM), --overwrite with another input wrong (the
earlier output must survive), an --out no folder can be made in, --compare naming --out, files an
evaluate.py --out would replace, sample folders that list one image twice, a toy scorer cache that
is not one, tools.to_safetensors' output, tools.same_runs' record, tools.build_cache's input and
--overwrite, tools.hpdv2_to_parquet's --overwrite. Each ends in one line `error: ...` (no
traceback) or the right result, with the user's files as they were."""
import contextlib
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
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


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
    assert line == f"error: --compare {earlier}/ is --out, whose images --overwrite deletes: compare another folder"
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


# ---------------------------------------------------------------------------------------
# evaluate.py: what --out would replace, and folders that list one image twice


@pytest.fixture
def toy_folder(tmp_path):
    S.main([*FAST[:6], "--prompts", "toy-test", "--out", str(tmp_path / "toy")])
    return tmp_path / "toy"


@pytest.mark.parametrize("name", ["samples.jsonl", "0000_seed0.png", "../notes.md", "../notes.json"])
def test_evaluate_never_replaces_a_users_file_with_its_results(tmp_path, toy_folder, name):
    """--out toy/samples.jsonl replaced the index it had just read; notes.md, an image: the same."""
    (tmp_path / "notes.md").write_text("my notes\n")
    (tmp_path / "notes.json").write_text('{"mine": 1}\n')
    before, notes = folder_bytes(toy_folder), folder_bytes(tmp_path)
    out = os.path.normpath(toy_folder / name)
    line = main_error(E.main, ["--images", toy_folder, "--metrics", "toy_style", "--out", out])
    assert line == f"error: --out {out} exists and is not an earlier result of evaluate.py: choose another name"
    assert folder_bytes(toy_folder) == before and folder_bytes(tmp_path) == notes


def test_evaluate_replaces_its_own_earlier_results_with_the_same_bytes(tmp_path, toy_folder):
    argv = ["--images", str(toy_folder), "--metrics", "toy_style,toy_content", "--out", str(tmp_path / "r.json")]
    E.main(argv)
    first = (tmp_path / "r.json").read_bytes()
    E.main(argv)
    assert (tmp_path / "r.json").read_bytes() == first and not (tmp_path / "r.json.part").exists()


def test_the_bar_chart_of_reward_metrics_never_replaces_a_users_file(tmp_path, toy_folder):
    """--out toy/0000_seed0.json: its bar chart, .json -> .png, replaced the sample image 0000_seed0.png;
    --out r.png: the chart replaced the results."""
    before = folder_bytes(toy_folder)
    line = main_error(E.main, ["--images", toy_folder, "--metrics", "clip", "--out", toy_folder / "0000_seed0.json"])
    assert line == (f"error: --out {toy_folder / '0000_seed0.json'}: its bar chart {toy_folder / '0000_seed0.png'} "
                    f"exists and is not an earlier result of evaluate.py: choose another name")
    line = main_error(E.main, ["--images", toy_folder, "--metrics", "clip", "--out", tmp_path / "r.png"])
    assert line == f"error: --out {tmp_path / 'r.png'}: the bar chart is written to the same name with .png: name the results .json"
    assert folder_bytes(toy_folder) == before


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A train.py folder's metrics.jsonl (what --curves reads)."""
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - s / 100, "implicit_acc": 0.5})
                                               + "\n" for s in range(1, 6)))
    return run


@pytest.mark.parametrize("name", ["curves.json", "curves.txt", "curves"])
def test_curves_to_a_name_matplotlib_cannot_write_is_one_line(tmp_path, run_dir, name):
    """.json, .txt: matplotlib's ValueError as a traceback; no suffix: it wrote curves.png and said curves."""
    line = main_error(E.main, ["--curves", f"a={run_dir}", "--out", tmp_path / name])
    assert line == f"error: --out {tmp_path / name}: a figure is written as .png, .pdf, .svg: name it so"
    assert os.listdir(tmp_path) == []


def test_curves_replace_their_own_figure_but_not_a_users(tmp_path, run_dir, toy_folder):
    for _ in range(2):
        E.main(["--curves", f"a={run_dir}", "--out", str(tmp_path / "c.pdf")])
    before = folder_bytes(toy_folder)
    line = main_error(E.main, ["--curves", f"a={run_dir}", "--out", toy_folder / "0000_seed0.png"])
    assert "exists and is not an earlier result of evaluate.py" in line and folder_bytes(toy_folder) == before


@pytest.mark.parametrize("curves", [["a=RUN", "a=RUN"], ["=RUN"]])
def test_curves_labels_twice_or_empty_are_refused(run_dir, curves, tmp_path):
    line = main_error(E.main, ["--curves", *[c.replace("RUN", str(run_dir)) for c in curves], "--out", tmp_path / "c.png"])
    assert line == "error: --curves takes LABEL=RUN_DIR pairs, each with a label of its own"


@pytest.mark.parametrize("points", ['{"a": [[1, NaN]]}', '{"a": [[1, true]]}', '{"a": [[Infinity, 0.5]]}'])
def test_style_points_that_are_not_finite_numbers_are_refused(tmp_path, run_dir, points):
    (tmp_path / "p.json").write_text(points)
    line = main_error(E.main, ["--curves", f"a={run_dir}", "--style_points", tmp_path / "p.json", "--out", tmp_path / "c.png"])
    assert line == f"error: --style_points {tmp_path / 'p.json'}: expected JSON {{label: [[step, style], ...]}}"


def test_empty_labels_are_refused(toy_folder, tmp_path):
    line = main_error(E.main, ["--images", toy_folder, toy_folder, "--labels", "a,", "--metrics", "toy_style",
                               "--out", tmp_path / "r.json"])
    assert line == "error: labels must differ and be non-empty, got 'a,'"


@pytest.mark.parametrize("change", ["record", "file"])
def test_a_folder_listing_one_image_twice_is_refused(toy_folder, change):
    """A (prompt, seed) listed twice, or two records naming one file: the toy metrics counted that
    image twice (a wrong mean, no word)."""
    index = toy_folder / "samples.jsonl"
    records = [json.loads(line) for line in index.read_text().splitlines()]
    if change == "record":
        records[1] = records[0]
    else:
        records[1]["file"] = records[0]["file"]
    index.write_text("".join(json.dumps(r) + "\n" for r in records))
    line = main_error(E.main, ["--images", toy_folder, "--metrics", "toy_style", "--out", toy_folder / "r.json"])
    what = "its (prompt, seed)" if change == "record" else "its file"
    assert line == f"error: {index}:2: {what} is listed on line 1 too: one image counted twice"


# ---------------------------------------------------------------------------------------
# The toy scorer's --scorer_cache


@pytest.fixture
def cache_pair(tmp_path):
    """A copy of the shipped winter scorer as a --scorer_cache for --scorer_seed 1 (its record says seed 1)."""
    from plumbing import toy_scorer
    src = os.path.join(toy_scorer.SHIPPED, "toy_scorer_winter_16")
    shutil.copy(src + ".safetensors", tmp_path / "sc.safetensors")
    meta = json.load(open(src + ".json"))
    meta["config"]["seed"] = 1
    (tmp_path / "sc.json").write_text(json.dumps(meta))
    return tmp_path / "sc.safetensors"


@pytest.mark.parametrize("damage", ["record cut short", "record a list", "weights garbage", "weights of another net",
                                    "a user's file"])
def test_a_scorer_cache_that_is_not_one_is_one_line_and_kept(tmp_path, toy_folder, cache_pair, damage, monkeypatch):
    """Each was a traceback (JSONDecodeError, AttributeError, SafetensorError, RuntimeError); a
    user's notes.md named as the cache, with no record beside it, was trained over and replaced."""
    from plumbing import toy_scorer
    monkeypatch.setattr(toy_scorer, "train_toy_scorer", lambda *a: pytest.fail("trained over the named cache"))
    meta = tmp_path / "sc.json"
    if damage == "record cut short":
        meta.write_text('{"config": ')
    elif damage == "record a list":
        meta.write_text("[1]")
    elif damage == "weights garbage":
        cache_pair.write_bytes(b"garbage")
    elif damage == "weights of another net":
        save_file({"w": torch.zeros(2)}, str(cache_pair))
    else:
        cache_pair = tmp_path / "notes.md"
        cache_pair.write_text("my notes\n")
    before = folder_bytes(tmp_path)
    line = main_error(E.main, ["--images", toy_folder, "--metrics", "toy_style", "--scorer_seed", "1",
                               "--scorer_cache", cache_pair, "--out", tmp_path / "r.json"])
    assert line.startswith(f"error: --scorer_cache {cache_pair}: ")
    assert ("not a toy scorer cache" in line) == damage.startswith(("record", "a user")), line
    assert folder_bytes(tmp_path) == before


def test_an_intact_scorer_cache_still_loads(tmp_path, toy_folder, cache_pair, capsys):
    E.main(["--images", str(toy_folder), "--metrics", "toy_style", "--scorer_seed", "1",
            "--scorer_cache", str(cache_pair), "--out", str(tmp_path / "r.json")])
    assert f"loaded {cache_pair}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# tools.to_safetensors: the output is checked before the checkpoint is read


@pytest.fixture
def checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2, 3)}}, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


@pytest.mark.parametrize("dst, message", [
    ("nodir/x.safetensors", "dst {d}: no folder {tmp}/nodir"),  # these three were SafetensorError tracebacks
    ("d.safetensors", "dst {d} is a folder, not a file"),
    ("mine.safetensors", "dst {d} exists; pass --overwrite to replace it"),  # this one was replaced
])
def test_to_safetensors_output_problems_are_one_line_before_reading(tmp_path, checkpoint, dst, message, monkeypatch):
    from tools import to_safetensors
    os.makedirs(tmp_path / "d.safetensors")
    save_file({"mine": torch.ones(1)}, str(tmp_path / "mine.safetensors"))
    before = folder_bytes(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read the checkpoint before checking the output"))
    line = main_error(to_safetensors.main, [checkpoint, tmp_path / dst])
    assert line == "error: " + message.format(d=tmp_path / dst, tmp=tmp_path)
    assert folder_bytes(tmp_path) == before


def test_to_safetensors_overwrite_replaces(tmp_path, checkpoint):
    from safetensors.torch import load_file
    from tools import to_safetensors
    save_file({"mine": torch.ones(1)}, str(tmp_path / "out.safetensors"))
    to_safetensors.main([str(checkpoint), str(tmp_path / "out.safetensors"), "--overwrite"])
    assert list(load_file(str(tmp_path / "out.safetensors"))) == ["w"]


# ---------------------------------------------------------------------------------------
# tools.same_runs: the record is read (or its place checked) before minutes of training


@pytest.mark.parametrize("mode, content, message", [
    ("check", None, "error: {p}: cannot be read as a record (FileNotFoundError: No such file or directory)"),
    ("check", "not json", "error: {p}: cannot be read as a record (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"),
    ("check", "[1]", "error: {p}: not a record of python -m tools.same_runs record"),
    ("check", '{"machine": "m", "runs": []}', "error: {p}: not a record of python -m tools.same_runs record"),
    ("record", "my notes\n", "error: record {p} exists and is not an earlier record: choose another name"),
    ("record", "folder", "error: record {p} is a folder, not a file"),
    ("verify", "", "error: usage: python -m tools.same_runs record FILE | check FILE [--new_metrics A,B] (--help says more)"),
])
def test_same_runs_refuses_a_record_before_running(tmp_path, monkeypatch, mode, content, message):
    """check: the record was opened after the nine runs (minutes), a missing or garbled one then a
    traceback; record: a user's file was replaced, a folder a traceback after the runs."""
    from tools import same_runs
    monkeypatch.setattr(same_runs, "run_all", lambda *a: pytest.fail("ran before checking the record"))
    path = tmp_path / "rec.json"
    if content == "folder":
        os.makedirs(path)
    elif content is not None:
        path.write_text(content)
    monkeypatch.setattr("sys.argv", ["same_runs", mode, str(path)])
    with pytest.raises(SystemExit) as err:
        same_runs.main()
    assert err.value.code == message.format(p=path)
    assert content in (None, "folder") or path.read_text() == content


def test_same_runs_records_over_an_earlier_record_and_checks_it(tmp_path, monkeypatch, capsys):
    from tools import same_runs
    monkeypatch.setattr(same_runs, "run_all", lambda *a: {"tiny-dpo": {"metrics": "abc", "final_loss": 0.5}})
    path = tmp_path / "rec.json"
    for mode in ("record", "record", "check"):
        monkeypatch.setattr("sys.argv", ["same_runs", mode, str(path)])
        with pytest.raises(SystemExit) if mode == "check" else contextlib.nullcontext():
            same_runs.main()
    assert "identical" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# tools.build_cache: its input, and --overwrite with another input wrong


@pytest.fixture
def cache_dir(tmp_path):
    from tools import build_cache
    build_cache.main(["--model", "tiny", "--data", "toy", "--num_items", "8", "--batch_size", "8",
                      "--out", str(tmp_path / "cache")])
    return tmp_path / "cache"


@pytest.mark.parametrize("bad", [["--data", "{tmp}/nothere.jsonl"], ["--embed_model", "{tmp}/nothere"],
                                 ["--data", "cache:{cache}"]])
def test_build_cache_overwrite_keeps_the_earlier_cache_when_another_input_is_wrong(tmp_path, cache_dir, bad):
    """--overwrite deleted the cache at the flag checks, then the manifest or the CLIP failed to
    load; --data cache:OUT read the cache it had just deleted."""
    from tools import build_cache
    before = folder_bytes(cache_dir)
    bad = [bad[0], bad[1].format(tmp=tmp_path, cache=cache_dir)]
    argv = ["--model", "tiny", "--data", "toy", "--num_items", "8", *bad, "--out", cache_dir, "--overwrite"]
    line = main_error(build_cache.main, argv)
    assert line.startswith("error: ") and (str(tmp_path / "nothere") in line or "is a cache already" in line)
    assert folder_bytes(cache_dir) == before


def test_build_cache_refuses_a_cache_as_its_data_and_a_resolution_train_would_refuse(tmp_path, cache_dir):
    """--data cache:DIR said 'built for --model tiny, not --model None'; --resolution 7 made a cache of
    0-pixel latents that train.py --resolution 7 refuses."""
    from tools import build_cache
    line = main_error(build_cache.main, ["--model", "tiny", "--data", f"cache:{cache_dir}", "--out", tmp_path / "c2"])
    assert line == (f"error: --data cache:{cache_dir} is a cache already; build one from pairs: toy, a .jsonl "
                    f"manifest, hf:DIR or pickapic:DIR")
    line = main_error(build_cache.main, ["--model", "tiny", "--data", "toy", "--resolution", "7", "--out", tmp_path / "c3"])
    assert line == "error: --resolution must be a multiple of 2 for --model tiny, not 7"
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_build_cache_overwrite_still_replaces(cache_dir):
    from tools import build_cache
    build_cache.main(["--model", "tiny", "--data", "toy", "--num_items", "4", "--out", str(cache_dir), "--overwrite"])
    assert json.loads((cache_dir / "index.json").read_text())["num_pairs"] == 4


# ---------------------------------------------------------------------------------------
# tools.hpdv2_to_parquet --overwrite: the earlier shards go only once the new ones are whole


@pytest.fixture
def hpd(tmp_path):
    from PIL import Image
    from tools import hpdv2_to_parquet as H
    os.makedirs(tmp_path / "train")
    for r in range(3):
        for side in (0, 1):
            Image.new("RGB", (8, 8), (80 * r, 200 * side, 0)).save(tmp_path / "train" / f"{r}-{side}.png")
    records = [{"human_preference": [1, 0], "prompt": f"p{r}", "file_path": [f"{r}-0.png", f"{r}-1.png"]} for r in range(3)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    H.main(["--json", str(tmp_path / "train.json"), "--images", str(tmp_path / "train"), "--out", str(tmp_path / "pq"),
            "--shard_rows", "1"])
    return tmp_path


@pytest.mark.parametrize("bad", ["json", "images", "no pairs"])
def test_hpdv2_overwrite_keeps_the_earlier_shards_when_the_input_is_wrong(hpd, bad):
    """--overwrite deleted the shards at the flag checks; then an unreadable --json, a missing
    --images or records without a readable pair left nothing."""
    from tools import hpdv2_to_parquet as H
    before = folder_bytes(hpd / "pq")
    if bad == "no pairs":
        (hpd / "bad.json").write_text(json.dumps([{"human_preference": [1, 0], "prompt": "x", "file_path": ["no.png", "pe.png"]}]))
    else:
        (hpd / "bad.json").write_text("[{" if bad == "json" else "[]")
    images = hpd / ("nothere" if bad == "images" else "train")
    line = main_error(H.main, ["--json", hpd / "bad.json", "--images", images, "--out", hpd / "pq", "--overwrite"])
    assert line.startswith("error: ")
    assert folder_bytes(hpd / "pq") == before


def test_hpdv2_overwrite_replaces_every_earlier_shard(hpd):
    from tools import hpdv2_to_parquet as H
    H.main(["--json", str(hpd / "train.json"), "--images", str(hpd / "train"), "--out", str(hpd / "pq"), "--overwrite"])
    assert sorted(os.listdir(hpd / "pq")) == ["train-00000-of-00001.parquet"]


# ---------------------------------------------------------------------------------------
# toy.experiment, toy.frontier, toy.factorial: flags checked before any base, run or scorer


def toy_runner_line(module, argv, capsys):
    """The one line (argparse's, exit 2) that the toy runner MODULE's parse_args ends ARGV in."""
    import importlib
    with pytest.raises(SystemExit) as err:
        importlib.import_module(f"toy.{module}").parse_args([str(a) for a in argv])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert "Traceback" not in text
    return text.strip().splitlines()[-1].split(": error: ", 1)[1]


@pytest.mark.parametrize("module", ["experiment", "frontier", "factorial"])
@pytest.mark.parametrize("argv, message", [
    (["--sample_steps", "0"], "--sample_steps must be at least 1, not 0"),  # a ZeroDivisionError after the base
    (["--guidance", "nan"], "--guidance must be a finite number, not nan"),  # frontier: NaN images, no word
    (["--guidance=-1"], "--guidance must be 0 or more, not -1.0"),
    (["--base_steps", "0"], "--base_steps must be at least 1, not 0"),  # named train.py's --max_steps
    (["--runs", "{tmp}/notes.md"], "--runs {tmp}/notes.md is a file, not a folder"),  # NotADirectoryError
    (["--out", "{tmp}/notes.md"], "--out {tmp}/notes.md is a file, not a folder"),  # FileExistsError
])
def test_toy_runner_flags_are_one_line(tmp_path, capsys, module, argv, message):
    (tmp_path / "notes.md").write_text("my notes\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert toy_runner_line(module, argv, capsys) == message.format(tmp=tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--align_steps", "0"], "--align_steps must be at least 1, not 0"),  # ran the study's 150 steps
    (["--sample_seeds", "0"], "--sample_seeds must be at least 1, not 0"),
    (["--curve_every", "0"], "--curve_every must be at least 1, not 0"),
    (["--variants", "dpo,nope"], "--variants: nope not in the demo study's (sft, dpo, rpo τ=0.5)"),  # ran none
    (["--variant", "a=--loss 'dpo"], "--variant a: \"--loss 'dpo\" cannot be split into flags (No closing quotation)"),
    (["--variant", "a=--loss dpo", "--variant", "a=--loss sft"], "--variant a is given twice: name each variant once"),
    (["--variant", "a=--loss dpo --learning_rate 1e-5"],  # --lrs' value replaced it without a word
     "--variant a: --learning_rate is the study's to set (--lrs, --seeds, --device, --runs): leave it out"),
    (["--variant", "a=--out_dir=elsewhere"],
     "--variant a: --out_dir=elsewhere is the study's to set (--lrs, --seeds, --device, --runs): leave it out"),
])
def test_toy_experiment_flags_are_one_line(capsys, argv, message):
    assert toy_runner_line("experiment", argv, capsys) == message


def test_toy_factorial_max_jobs_below_one_is_refused(capsys):
    assert toy_runner_line("factorial", ["--max_jobs=-1"], capsys) == "--max_jobs must be at least 1, not -1"


def test_toy_runner_flags_that_were_fine_still_are():
    from toy import experiment, factorial, frontier
    args = experiment.parse_args(["--variant", "t1=--loss rpo --tau 0.1 --batch_size 4", "--lrs", "1e-6,1e-5"])
    assert args.custom == {"t1": ["--loss", "rpo", "--tau", "0.1", "--batch_size", "4"]} and args.study == "custom"
    assert experiment.parse_args(["--study", "full", "--variants", "dpo,sft"]).variants == "dpo,sft"
    assert frontier.parse_args(["--collect"]).collect and factorial.parse_args(["--max_jobs", "2"]).max_jobs == 2


# ---------------------------------------------------------------------------------------
# tools.build_style: a rerun continues only an output made the same way


@pytest.fixture
def style_out(tmp_path):
    from PIL import Image
    from tools import build_style
    for i in range(2):
        Image.new("RGB", (16, 16), (120 * i, 30, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "winner": f"{i}.png", "loser": f"{1 - i}.png"})
                                                + "\n" for i in range(2)))
    build_style.main(["--style", "toy-winter", "--src", str(tmp_path / "src.jsonl"), "--out", str(tmp_path / "o"),
                      "--resolution", "16"])
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (["--style", "toy-sketch"], "--style toy-winter, this command has --style toy-sketch"),
    (["--src", "{tmp}/other.jsonl"], "--src {tmp}/src.jsonl, this command has --src {tmp}/other.jsonl"),
    (["--resolution", "32"], "--resolution 16, this command has --resolution 32"),
])
def test_build_style_rerun_with_other_settings_is_refused(style_out, change, message):
    """It said 'wrote 0 new pairs': the sources done in the other style counted as done (another
    --src: its sources, by index, skipped), so the folder held pairs of a style not asked for."""
    from tools import build_style
    shutil.copy(style_out / "src.jsonl", style_out / "other.jsonl")
    flags = {"--style": "toy-winter", "--src": str(style_out / "src.jsonl"), "--resolution": "16"}
    flags[change[0]] = change[1].format(tmp=style_out)
    before = folder_bytes(style_out / "o")
    line = main_error(build_style.main, [x for kv in flags.items() for x in kv] + ["--out", style_out / "o"])
    assert line == (f"error: --out {style_out / 'o'} was built with {message.format(tmp=style_out)}: choose another "
                    f"--out (its pairs would be skipped or mixed)")
    assert folder_bytes(style_out / "o") == before


def test_build_style_rerun_with_the_same_settings_continues(style_out, capsys):
    from tools import build_style
    build_style.main(["--style", "toy-winter", "--src", str(style_out / "src.jsonl"), "--out", str(style_out / "o"),
                      "--resolution", "16", "--steps", "3"])  # (--steps: the editor's, no toy pair's)
    assert "wrote 0 new pairs" in capsys.readouterr().out


def test_hpdv2_a_preference_that_is_not_a_finite_number_is_a_counted_skip(hpd):
    """[NaN, 0] compared false both ways: written as 'the second preferred', without a word."""
    from tools import hpdv2_to_parquet as H
    records = [{"human_preference": [float("nan"), 0], "prompt": "nan", "file_path": ["0-0.png", "0-1.png"]},
               {"rank": [1, float("inf")], "prompt": "inf", "file_path": ["1-0.png", "1-1.png"]},
               {"human_preference": [1, 0], "prompt": "ok", "file_path": ["2-0.png", "2-1.png"]}]
    (hpd / "nan.json").write_text(json.dumps(records))  # (json writes NaN and Infinity, and reads them back)
    assert H.convert(str(hpd / "nan.json"), str(hpd / "train"), str(hpd / "pq2")) == (1, {"not a record": 2})


@pytest.mark.parametrize("split", ["", "../x", "a/b", ".hidden", "tr*"])
def test_hpdv2_split_that_is_not_a_name_is_one_line(hpd, split):
    """'../x' was a traceback (pyarrow's FileNotFoundError); '' wrote '-00000-of-00001.parquet'."""
    from tools import hpdv2_to_parquet as H
    line = main_error(H.main, ["--json", hpd / "train.json", "--images", hpd / "train", "--out", hpd / "pq3",
                               "--split", split])
    assert line == f"error: --split {split!r}: a name for the shards (train, test), not a path or pattern"
    assert not (hpd / "pq3").exists()


# ---------------------------------------------------------------------------------------
# An --out that is a symbolic link leading nowhere


@pytest.mark.parametrize("kind", ["dangling", "loop", "below a dangling link"])
def test_an_out_that_is_a_link_to_nothing_is_one_line_before_loading(tmp_path, kind):
    """os.makedirs fails on it: build_cache's FileExistsError traceback after the encoders loaded;
    sample.py's 'cannot write ... File exists' after the models."""
    from tools import build_cache
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    os.symlink(tmp_path / "loop2", tmp_path / "loop")
    os.symlink(tmp_path / "loop", tmp_path / "loop2")
    out, link = {"dangling": ("dangling", "dangling"), "loop": ("loop", "loop"),
                 "below a dangling link": ("dangling/sub", "dangling")}[kind]
    message = (f"error: --out {tmp_path / out}: {tmp_path / link} is a symbolic link that leads nowhere; remove it or "
               f"choose another folder")
    assert main_error(S.main, [*FAST, "--out", tmp_path / out]) == message
    assert main_error(build_cache.main, ["--data", "toy", "--out", tmp_path / out]) == message
    assert not os.path.exists(tmp_path / "gone")


def test_style_points_of_no_curve_are_refused(tmp_path, run_dir):
    # Before: a label that names no --curves run was drawn nowhere, without a word.
    (tmp_path / "p.json").write_text('{"a": [[1, 0.5]], "b": [[1, 0.7]]}')
    line = main_error(E.main, ["--curves", f"a={run_dir}", "--style_points", tmp_path / "p.json", "--out", tmp_path / "c.png"])
    assert line == "error: --style_points names ['b'], no --curves label"


def test_a_label_holding_a_bar_keeps_the_markdown_table_whole():
    # Before: a | in a label (--labels "a|b") ended its cell: the row had one column too many.
    table = E.markdown_table([{"model": "a|b", "images": 4}], ["model", "images"])
    assert table.splitlines()[2] == "| a\\|b | 4 |"
