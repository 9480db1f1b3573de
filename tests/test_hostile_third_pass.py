"""Issue #35's cases, a class each: a path whose name is not UTF-8, state.json values out of range,
a checkpoint missing an optimizer moment, pickled weights wherever weights load, a full disk while
safetensors writes, one flag under two names, a --resume past --max_steps, a signal during the
final save, losses that are not numbers in --curves, an --out_dir (or a tool's --out) that holds a
user's files, sample.py writing as it goes, a run killed before its first checkpoint rerun with
--resume, and checkpoints that verify their bytes. Each ends as asserted: one line, a counted
skip, or the right result, with the user's files as they were."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate as E
import sample as S
import train
from conftest import finished_run
from plumbing import checkpoint as C
from plumbing import files, hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def one_line(fn, *a):
    with pytest.raises(SystemExit) as err:
        fn(*a)
    code = err.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    return code


def argparse_line(fn, argv, capsys):
    """The one line a refusal ends in: argparse's (exit 2, on stderr) or a SystemExit's own."""
    with pytest.raises(SystemExit) as err:
        fn(argv)
    if isinstance(err.value.code, str):
        assert err.value.code.startswith("error: ") and "\n" not in err.value.code, err.value.code
        return err.value.code
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run: checkpoint-000001, checkpoint-000002, unet/, args.json, README.md."""
    out = finished_run(tmp_path_factory, 2)
    return out


from test_hostile_runs import copy_run  # noqa: E402  (a copy of a finished run, as there)


# ---------------------------------------------------------------------------------------
# Tracebacks before
def test_an_out_dir_whose_name_is_not_utf8_is_refused_before_anything_loads(tmp_path, capsys):
    out = os.path.join(str(tmp_path), os.fsdecode(b"x\xffy"))
    line = argparse_line(train.main, ["--max_steps", "1", "--out_dir", out, *FAST], capsys)
    assert "byte 0xff, which is not UTF-8" in line and "\\xff" in line
    assert not os.path.exists(out)


def test_the_model_card_shows_a_path_that_is_not_utf8_escaped(tmp_path):
    # --data's path in the card: written as \xNN (the card stays UTF-8), never a UnicodeEncodeError
    assert files.shown(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert files.shown("café") == "café"


@pytest.mark.parametrize("key,value", [("epoch", 2 ** 70), ("items_in_epoch", 2 ** 31), ("step", -1),
                                       ("skip_counts", {"x": "y"}), ("world_size", 0), ("cwd", 5),
                                       ("args", {"model": ["tiny"]}), ("sha256", [])])
def test_state_json_values_out_of_range_make_a_checkpoint_broken(finished, tmp_path, key, value):
    out = copy_run(finished, tmp_path)
    path = out / "checkpoint-000002" / "state.json"
    state = json.loads(path.read_text())
    state[key] = value if key != "args" else dict(state["args"], **value)
    path.write_text(json.dumps(state))
    problem = C.inspect_checkpoint(str(out / "checkpoint-000002"))[0]
    assert problem and "malformed" in problem and (key in problem or key == "args")
    # --resume walks back to checkpoint-000001 and trains on: no traceback after "resumed from"
    train.main(["--max_steps", "3", "--resume", "--out_dir", str(out), *FAST])
    assert json.loads((out / "checkpoint-000003" / "state.json").read_text())["step"] == 3


def test_a_checkpoint_missing_an_optimizer_moment_is_walked_past(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    path = str(out / "checkpoint-000002" / "optimizer.safetensors")
    tensors = load_file(path)
    tensors.pop("0.exp_avg")
    save_file(tensors, path)
    state_path = out / "checkpoint-000002" / "state.json"  # (and its digest updated: only the moment is wrong)
    state = json.loads(state_path.read_text())
    state["sha256"]["optimizer.safetensors"] = C.file_digest(path)
    state_path.write_text(json.dumps(state))
    train.main(["--max_steps", "3", "--resume", "--out_dir", str(out), *FAST])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "lacks 0.exp_avg" in printed and "resumed from" in printed
    assert "checkpoint-000001 at step 1" in printed
    # given as the folder: one line
    assert "lacks 0.exp_avg" in one_line(train.main, ["--max_steps", "3", "--resume", str(out / "checkpoint-000002"),
                                                      "--out_dir", str(tmp_path / "other"), *FAST])


# ---------------------------------------------------------------------------------------
# Pickles: never read, wherever weights load
@pytest.fixture
def pickled(tmp_path, monkeypatch):
    """Model folders whose weights are pickles; torch.load fails the test if anything calls it."""
    from test_hostile_fuzz import pickled_model_folders, no_pickles
    pickled_model_folders(tmp_path)
    no_pickles(monkeypatch)
    return tmp_path


def test_pickled_weights_are_refused_by_every_loader(pickled):
    for load, where in ((lambda: hub.load_unet(str(pickled / "pickled-unet"), "--init"), "pickled-unet"),
                        (lambda: hub.load_unet(str(pickled / "pickled-pipeline"), "--unet"), "pickled-pipeline/unet"),
                        (lambda: hub.load_clip(str(pickled / "pickled-clip"), "--clip_model", "CLIP", "cpu"),
                         "pickled-clip"),
                        (lambda: hub.load_real(str(pickled / "pickled-pipeline"), False), "pickled-pipeline/unet")):
        line = one_line(load)
        assert "is a pickle" in line and "python -m tools.to_safetensors" in line and where in line
    from test_hostile_fuzz import UNPICKLED
    assert not UNPICKLED


@pytest.mark.parametrize("program,argv", [
    ("train", ["--init", "pickled-unet"]), ("train", ["--embed_model", "pickled-clip"]),
    ("train", ["--model", "sd15", "--pretrained", "pickled-pipeline"]),
    ("sample", ["--unet", "pickled-unet"]), ("sample", ["--model", "sd15", "--pretrained", "pickled-pipeline"]),
    ("evaluate", ["--metrics", "clip", "--clip_model", "pickled-clip"]),
    ("evaluate", ["--metrics", "pickscore", "--pickscore_model", "pickled-clip"]),
    ("build_cache", ["--embed_model", "pickled-clip"])])
def test_pickled_weights_are_refused_before_anything_loads(pickled, monkeypatch, capsys, program, argv):
    monkeypatch.chdir(pickled)
    from tools import build_cache
    main, base = {"train": (train.main, ["--max_steps", "1", "--out_dir", "run"]),
                  "sample": (S.main, ["--out", "samples"]), "evaluate": (E.main, ["--images", "samples"]),
                  "build_cache": (build_cache.main, ["--data", "toy", "--out", "cache"])}[program]
    line = argparse_line(main, base + [str(a) for a in argv], capsys)
    assert "is a pickle" in line and "python -m tools.to_safetensors" in line


def test_the_converter_named_makes_a_folder_that_loads(pickled, tmp_path, monkeypatch):
    """The line's command works: tools.to_safetensors turns the pickle into the file the loader reads."""
    from diffusers import UNet2DConditionModel
    from tools import to_safetensors
    monkeypatch.undo()  # (the converter reads the pickle, with weights_only: its own job)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=4,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2)
    folder = tmp_path / "u"
    unet.save_pretrained(folder, safe_serialization=False)
    line = one_line(hub.load_unet, str(folder), "--init")
    src, dst = line.split("python -m tools.to_safetensors ")[1].split()
    to_safetensors.main([src, dst])
    got = hub.load_unet(str(folder), "--init")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in unet.state_dict().items())


# ---------------------------------------------------------------------------------------
def test_a_full_disk_while_safetensors_writes_ends_in_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    import plumbing.checkpoint as checkpoint
    out = tmp_path / "run"

    def full(*a, **k):  # safetensors' own class, its message as its writer words it (0.4-0.6)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full)
    line = one_line(train.main, ["--max_steps", "1", "--out_dir", str(out), *FAST])
    assert line.startswith(f"error: cannot write in {out}: No space left on device") and "no checkpoint was saved" in line
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-")]


def test_one_flag_under_two_names_is_refused(capsys):
    for argv in (["--lr", "1e-5", "--learning_rate", "1e-3"], ["--out_dir", "a", "--output_dir", "b"],
                 ["--data", "toy", "--dataset_name", "x"], ["--no_hflip", "--random_flip"],
                 ["--lr=1e-5", "--learning_rate=1e-5"]):
        line = argparse_line(train.parse_args, argv, capsys)
        assert "set one setting" in line and "pass one of them" in line, (argv, line)
    assert train.parse_args(["--lr", "1e-5", "--lr", "1e-3"]).lr == 1e-3  # (one name twice: argparse's rule)
    # what the diffusers scripts pass together stays accepted
    assert train.parse_args(["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "7"]).warmup_steps == 7
    from tools import build_cache
    line = argparse_line(build_cache.main, ["--data", "toy", "--out", "x", "--pretrained", "a",
                                            "--pretrained_model_name_or_path", "b"], capsys)
    assert "set one setting" in line


def test_resume_past_max_steps_is_refused_and_changes_nothing(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = {n: (out / n).read_bytes() for n in ("args.json", "README.md", "metrics.jsonl")}
    line = one_line(train.main, ["--max_steps", "1", "--resume", "--out_dir", str(out), *FAST])
    assert "at step 2, past --max_steps 1: nothing to train" in line
    assert {n: (out / n).read_bytes() for n in before} == before


def test_resume_at_max_steps_says_nothing_is_left_to_train(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    train.main(["--max_steps", "2", "--resume", "--out_dir", str(out), *FAST])
    assert "nothing left to train" in capsys.readouterr().out


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_during_the_final_export_is_told_truthfully(tmp_path, signals):
    out = tmp_path / "run"
    script = (f"import os, signal, sys, time; sys.path.insert(0, {ROOT!r}); import train; "
              f"from plumbing import checkpoint as C; real = C.export\n"
              f"def export(*a):\n"
              f"    for _ in range({signals}):\n"
              f"        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
              f"    return real(*a)\n"
              f"C.export = export; train.main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", script, "--max_steps", "1", "--out_dir", str(out), *FAST], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 143, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert C.checkpoint_problem(str(out / "checkpoint-000001")) is None  # the final checkpoint is whole
    if signals == 1:  # the save and export finished, and the line says so
        assert "came after the last step; the final save and export finished" in last and (out / "unet").is_dir()
    else:  # the second stops at once: the line says the checkpoint was saved, not "this step not saved"
        assert "after the final checkpoint was saved" in last and "not saved" not in last


def test_curves_of_losses_that_are_not_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n'
                                       '{"step": 3, "loss": "x"}\n')
    line = one_line(E.main, ["--curves", f"a={run}", "--out", str(tmp_path / "c.png")])
    assert "no step with a finite loss (3 steps read)" in line and not (tmp_path / "c.png").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.5}\n{"step": 5, "loss": 0.25}\n')
    E.main(["--curves", f"a={run}", "--out", str(tmp_path / "c.png")])
    assert "skipped 3 of 5 steps whose loss is not a finite number" in capsys.readouterr().err
    assert (tmp_path / "c.png").is_file()


# ---------------------------------------------------------------------------------------
# A user's files
def test_an_out_dir_holding_a_users_files_and_no_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    line = one_line(train.main, ["--max_steps", "1", "--out_dir", str(out), *FAST])
    assert "holds files that are not a run's (README.md)" in line
    line = one_line(train.main, ["--max_steps", "1", "--out_dir", str(out), "--overwrite", *FAST])
    assert "holds files that are not a run's" in line
    assert sorted(os.listdir(out)) == ["README.md"] and (out / "README.md").read_text() == "my notes\n"


def test_build_cache_over_an_earlier_cache_needs_overwrite(tmp_path, capsys):
    from tools import build_cache
    out = tmp_path / "cache"
    build_cache.main(["--data", "toy", "--num_items", "8", "--shard_size", "4", "--out", str(out)])
    first = sorted(os.listdir(out))
    line = one_line(build_cache.main, ["--data", "toy", "--num_items", "4", "--out", str(out)])
    assert "holds an earlier output" in line and "--overwrite" in line and sorted(os.listdir(out)) == first
    build_cache.main(["--data", "toy", "--num_items", "4", "--shard_size", "4", "--out", str(out), "--overwrite"])
    index = json.load(open(out / "index.json"))
    shards = sorted(n for n in os.listdir(out) if n.startswith("shard-"))
    assert shards == sorted(s["file"] for s in index["shards"]) and index["num_pairs"] == 4  # no old shard beside
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert "not this program's output (a.txt)" in one_line(build_cache.main, ["--data", "toy", "--out",
                                                                             str(tmp_path / "notes")])


# ---------------------------------------------------------------------------------------
def test_sample_writes_as_it_goes_and_resume_skips_what_is_there(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    argv = ["--prompts", "a cat|a dog|a cow", "--seeds", "0-1", "--steps", "2", "--batch_size", "2", "--out", str(out)]
    seen = []
    real = S.generate_batches

    def watch(*a, **k):  # after each batch, its images and lines are on disk before the next is sampled
        for chunk, images in real(*a, **k):
            seen.append((len(chunk), sorted(os.listdir(out))))
            yield chunk, images
    monkeypatch.setattr(S, "generate_batches", watch)
    full = S.main(argv)
    assert [n for n, _ in seen] == [2, 2, 2]
    assert len([f for f in seen[2][1] if f.endswith("_seed0.png") or f.endswith("_seed1.png")]) == 4  # 2 batches
    assert "sampling" in capsys.readouterr().err  # the progress bar
    assert "holds an earlier output" in one_line(S.main, argv)  # never over an earlier output without a word
    # a run cut short: one image and its line gone, another's line cut; --resume makes only those two
    rows = (out / "samples.jsonl").read_text().splitlines()
    os.remove(out / json.loads(rows[3])["file"])
    (out / "samples.jsonl").write_text("\n".join(rows[:3] + rows[5:]) + "\n" + rows[4][:20])  # (row 4: cut by a kill)
    seen.clear()
    again = S.main(argv + ["--resume"])
    assert [n for n, _ in seen] == [2]  # the missing image and the one whose line was cut
    assert (again == full).all()
    index = files.read_index(str(out))
    assert sorted((r["prompt"], r["seed"]) for r in index) == sorted((p, s) for p in ("a cat", "a dog", "a cow")
                                                                      for s in (0, 1))
    assert "with --steps 2, this command with 3" in one_line(S.main, argv[:-4] + ["--steps", "3", "--batch_size", "2",
                                                                                "--out", str(out), "--resume"])


def test_sample_holds_no_images_beyond_the_grid_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "GRID_MAX", 3)
    got = S.main(["--prompts", "a cat|a dog", "--seeds", "0-1", "--steps", "1", "--out", str(tmp_path / "s")])
    assert got is None and "no grid.png: more than 3 images" in capsys.readouterr().out
    assert len(files.read_index(str(tmp_path / "s"))) == 4 and not (tmp_path / "s" / "grid.png").exists()


# ---------------------------------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_reruns_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--max_steps", "2", "--out_dir", str(out), *FAST]
    train.main(argv)
    for name in os.listdir(out):  # what a kill before the first save leaves: args.json, a log, the lock
        if name not in ("args.json", "metrics.jsonl"):
            shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    train.main(argv + ["--resume"])
    assert "this command's own run, stopped before its first checkpoint: starting it again" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # another command's partial run is still refused
    for name in os.listdir(out):
        if name not in ("args.json", "metrics.jsonl"):
            shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    assert "with no checkpoint to continue" in one_line(train.main, argv[:-1] + ["8", "--lr", "1e-3", "--resume"])


def test_checkpoints_verify_their_bytes(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    assert C.verify(str(out), log=lambda line: None) == 0
    weights = out / "checkpoint-000002" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # one bit inside a tensor: the header and size are as they were
    weights.write_bytes(bytes(data))
    assert C.checkpoint_problem(str(out / "checkpoint-000002")) is None  # (headers alone miss it)
    assert "does not match its sha256" in C.inspect_checkpoint(str(out / "checkpoint-000002"), verify=True)[0]
    p = subprocess.run([sys.executable, "-m", "plumbing.checkpoint", str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "checkpoint-000002: broken" in p.stdout and "checkpoint-000001: whole" in p.stdout
    train.main(["--max_steps", "3", "--resume", "--out_dir", str(out), *FAST])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "resumed from" in printed and "checkpoint-000001 at step 1" in printed
