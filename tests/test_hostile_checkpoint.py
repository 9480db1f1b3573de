"""A hostile tester's cases for checkpoints, resuming and the output folder (plumbing/checkpoint.py,
plumbing/run_dir.py): a fresh run into a finished run's folder, checkpoints broken in every way a
kill or a bad copy breaks them, kills at random moments around a checkpoint's replacement, and a
resume with other settings. Each ends in the exact outcome asserted: a one-line error, or a run that falls back to
the newest complete checkpoint and ends with the weights of an uninterrupted run."""
import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import loss as L
from plumbing import checkpoint as C
from plumbing import report, run_dir
import model as M
import train
from conftest import finished_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]
WIRED = hasattr(train.parse_args([]), "overwrite")
needs_wiring = pytest.mark.skipif(not WIRED, reason="train.py wiring pending")
WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run: checkpoint-000001..3, metrics.jsonl, unet/."""
    out = finished_run(tmp_path_factory, 3)
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000001", "checkpoint-000002",
                                       "checkpoint-000003", "metrics.jsonl", "unet"]
    return out


@pytest.fixture(scope="module")
def tiny():
    """(m, optimizer with state, scaler) for saving checkpoints directly."""
    m = M.load_models("tiny", reference=False)
    optimizer = torch.optim.AdamW(m.unet.parameters(), lr=1e-3)
    for p in m.unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return m, optimizer, torch.amp.GradScaler("cpu", enabled=False)


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def read_steps(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


def same_weights(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_args(out, **changes):
    """train.py's flags for OUT as a Namespace (the flags train.py does not define yet included)."""
    args = train.parse_args(FAST)  # (parse_args refuses an --out_dir that is a file: check_out_dir is under test)
    args.out_dir, args.overwrite, args.allow_changed_resume = str(out), False, False
    vars(args).update(changes)
    return args


def exit_message(fn, *a):
    with pytest.raises(SystemExit) as err:
        fn(*a)
    assert isinstance(err.value.code, str) and "\n" not in err.value.code
    return err.value.code

def check_resume_settings(args, ckpt, state, log=print):
    """checkpoint.check_resume_settings as train.py calls it: with the settings the objective reads
    and the preset's resolution."""
    return C.check_resume_settings(args, ckpt, state, L.settings_of(args.loss), M.PRESETS[args.model]["resolution"], log)


# ---------------------------------------------------------------------------------------
# 1. A fresh run into a folder that holds a run


def test_fresh_run_into_a_finished_run_is_refused_and_nothing_changes(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
    metrics = (out / "metrics.jsonl").read_bytes()
    assert exit_message(run_dir.check_out_dir, run_args(out), True) == (
        f"error: {out} holds a run (checkpoint-000003, metrics.jsonl); continue it with --resume, or pass "
        f"--overwrite to start over (its checkpoints and metrics are deleted)")
    assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_overwrite_deletes_that_run_and_nothing_else(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    os.makedirs(out / "checkpoint-000004.tmp")  # an interrupted save's leftover is the run's too
    os.makedirs(out / "samples")
    (out / "notes.txt").write_text("mine")
    args = run_args(out, overwrite=True)
    doomed = run_dir.check_out_dir(args, True)
    assert len(os.listdir(out)) == 10 and capsys.readouterr().out == ""  # (deleted once the models have loaded)
    run_dir.make_out_dir(args, doomed, True)
    assert sorted(os.listdir(out)) == ["notes.txt", "samples"]
    assert capsys.readouterr().out.splitlines() == [
        f"--overwrite: deleted the run in {out} (checkpoint-000004.tmp, checkpoint-000003, checkpoint-000002, "
        f"checkpoint-000001, metrics.jsonl, unet, args.json, README.md)"]


def test_overwrite_will_not_delete_the_init_it_starts_from(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    init = str(out / "unet")
    assert exit_message(run_dir.check_out_dir, run_args(out, overwrite=True, init=init), True) == (
        f"error: --init {init} lies in {out / 'unet'}, which --overwrite would delete; move it out first or "
        f"choose another --out_dir")
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000001", "checkpoint-000002",
                                       "checkpoint-000003", "metrics.jsonl", "unet"]


@pytest.mark.parametrize("case, expected", [
    ("missing", None), ("empty", None), ("empty metrics", None),
    ("other files", "error: --out_dir {out} holds files that are not a run's (README, checkpoints-old); a run writes "
                    "only into an empty folder or its own run: choose another --out_dir"),  # (issue #35: the user's)
    ("metrics only", "error: {out} holds a run (metrics.jsonl) with no checkpoint to continue; pass --overwrite "
                     "to start over (its metrics and weights are deleted), or choose another --out_dir"),
    ("a file", "error: --out_dir {out} is a file, not a folder"),
    ("resume and overwrite", "error: --overwrite starts over and --resume continues: pass one of them"),
])
def test_out_dir_cases(tmp_path, case, expected):
    out = tmp_path / "o"
    if case != "missing":
        os.makedirs(out)
    if case == "empty metrics":  # a run that stopped before its first step left nothing to lose
        (out / "metrics.jsonl").write_text("")
    if case == "other files":
        (out / "README").write_text("x")
        os.makedirs(out / "checkpoints-old")
    if case == "metrics only":
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    if case == "a file":
        os.rmdir(out)
        out.write_text("x")
    args = run_args(out, overwrite=case == "resume and overwrite", resume="latest" if "resume" in case else None)
    if expected is None:
        run_dir.check_out_dir(args, True)
    else:
        assert exit_message(run_dir.check_out_dir, args, True) == expected.format(out=out)


def test_args_without_the_new_flags_are_refused_like_without_overwrite(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    args = train.parse_args(["--out_dir", str(out), *FAST])  # what train.py passes today
    assert exit_message(run_dir.check_out_dir, args, True).startswith(f"error: {out} holds a run (checkpoint-000003")


@needs_wiring
def test_the_testers_case_end_to_end(finished, tmp_path, capsys):
    """A fresh 2-step run into a copy of a finished 3-step run: refused; with --overwrite it
    trains from scratch, keeps its own checkpoints, and --resume then continues *it*."""
    out = copy_run(finished, tmp_path)
    argv = ["--max_steps", "2", "--save_every", "1", "--keep_checkpoints", "2", "--out_dir", str(out), *FAST]
    assert exit_message(train.main, argv).startswith(f"error: {out} holds a run (checkpoint-000003, metrics.jsonl)")
    assert read_steps(out) == [1, 2, 3]
    train.main(argv + ["--overwrite"])
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000001", "checkpoint-000002", "metrics.jsonl",
                                "unet"]
    assert read_steps(out) == [1, 2]
    capsys.readouterr()
    train.main(argv + ["--resume"])
    assert f"resumed from {out / 'checkpoint-000002'} at step 2" in capsys.readouterr().out
    # this run's weights (the same seed and flags as the finished run's first 2 steps), not the old run's
    assert same_weights(out / "unet" / "diffusion_pytorch_model.safetensors", finished / "checkpoint-000002" / WEIGHTS)


# ---------------------------------------------------------------------------------------
# 2. Broken checkpoints: resume walks back to the newest complete one


def truncate(path):
    full = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(full // 2)
    return full // 2, full


def break_checkpoint(ckpt, how):
    """Break CKPT as HOW; returns the reason resume must give."""
    if how == "killed while the old one was deleted":
        # the old save's order: rmtree(PATH) cut short, the full new copy still in PATH.tmp
        shutil.copytree(ckpt, str(ckpt) + ".tmp")
        for name in os.listdir(ckpt):
            if name != "rng.safetensors":
                p = ckpt / name
                shutil.rmtree(p) if p.is_dir() else os.remove(p)
        return "has no state.json (its save did not finish)"
    if how == "truncated weights":
        got, promised = truncate(ckpt / WEIGHTS)
        return (f"unet/diffusion_pytorch_model.safetensors is truncated or corrupt ({got} bytes where its header "
                f"promises {promised})")
    if how == "truncated optimizer":
        got, promised = truncate(ckpt / "optimizer.safetensors")
        return f"optimizer.safetensors is truncated or corrupt ({got} bytes where its header promises {promised})"
    if how == "garbage optimizer header":
        (ckpt / "optimizer.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
        return "optimizer.safetensors is corrupt (its header is not a safetensors header)"
    if how == "garbage state.json":
        (ckpt / "state.json").write_text('{"step": 3, "ep')
        return "state.json is not valid JSON (cut short or overwritten)"
    if how == "{} state.json":
        (ckpt / "state.json").write_text("{}")
        return "state.json lacks step, epoch, items_in_epoch, args, optimizer"
    if how == "missing rng":
        os.remove(ckpt / "rng.safetensors")
        return "rng.safetensors is missing"
    if how == "missing state.json":
        os.remove(ckpt / "state.json")
        return "has no state.json (its save did not finish)"
    if how == "missing unet config":
        os.remove(ckpt / "unet" / "config.json")
        return "unet/config.json is missing"
    raise ValueError(how)


BREAKS = ["truncated weights", "truncated optimizer", "garbage optimizer header", "garbage state.json",
          "{} state.json", "missing rng", "missing state.json", "missing unet config"]


@pytest.mark.parametrize("how", BREAKS)
def test_resume_falls_back_past_a_broken_newest_checkpoint(finished, tmp_path, capsys, how):
    out = copy_run(finished, tmp_path)
    reason = break_checkpoint(out / "checkpoint-000003", how)
    train.main(["--max_steps", "3", "--out_dir", str(out), "--resume", *FAST])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"warning: skipping {out / 'checkpoint-000003'}: {reason}",
                         f"resumed from {out / 'checkpoint-000002'} at step 2"]
    assert lines[-1] == f"done: 3 steps; UNet in {out / 'unet'}"
    # step 3 replayed: the weights and the log of the uninterrupted run, and checkpoint 3 whole again
    assert same_weights(out / "unet" / "diffusion_pytorch_model.safetensors", finished / "unet" /
                        "diffusion_pytorch_model.safetensors")
    assert read_steps(out) == [1, 2, 3]
    assert C.checkpoint_problem(str(out / "checkpoint-000003")) is None
    # (--keep_checkpoints 2: the final save prunes checkpoint 1; no .tmp or .old is left)
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000002", "checkpoint-000003",
                                "metrics.jsonl", "unet"]


def test_a_kill_between_delete_and_rename_resumes_from_the_complete_tmp(finished, tmp_path, capsys):
    """The tester's case: checkpoint-000003/ holds only rng.safetensors, the full copy is in
    checkpoint-000003.tmp. Resume takes the .tmp (no step is lost) and puts it back in place."""
    out = copy_run(finished, tmp_path)
    reason = break_checkpoint(out / "checkpoint-000003", "killed while the old one was deleted")
    train.main(["--max_steps", "3", "--out_dir", str(out), "--resume", *FAST])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"warning: skipping {out / 'checkpoint-000003'}: {reason}",
                         f"resumed from {out / 'checkpoint-000003.tmp'} at step 3"]
    assert lines[-1] == f"done: 3 steps; UNet in {out / 'unet'}"
    assert same_weights(out / "unet" / "diffusion_pytorch_model.safetensors",
                        finished / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000002", "checkpoint-000003",
                                "metrics.jsonl", "unet"]
    assert C.checkpoint_problem(str(out / "checkpoint-000003")) is None


def test_every_checkpoint_broken_is_one_line(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    for step, how in ((3, "truncated weights"), (2, "{} state.json"), (1, "missing rng")):
        reason = break_checkpoint(out / f"checkpoint-{step:06d}", how)
        if step == 3:
            newest = reason
    args = run_args(out, resume="latest")
    assert exit_message(C.find_checkpoint, args) == (
        f"error: --resume found no complete checkpoint in '{out}': all 3 are broken (the newest, "
        f"{out / 'checkpoint-000003'}, {newest})")
    assert len(capsys.readouterr().out.splitlines()) == 3  # one warning line for each


@pytest.mark.parametrize("how", BREAKS)
def test_an_explicit_broken_checkpoint_is_one_line_naming_the_problem(finished, tmp_path, how):
    out = copy_run(finished, tmp_path)
    reason = break_checkpoint(out / "checkpoint-000003", how)
    folder = str(out / "checkpoint-000003")
    assert exit_message(C.find_checkpoint, run_args(out, resume=folder)) == f"error: --resume {folder}: {reason}"


def test_an_explicit_broken_checkpoint_end_to_end(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    reason = break_checkpoint(out / "checkpoint-000002", "truncated optimizer")
    folder = str(out / "checkpoint-000002")
    assert exit_message(train.main, ["--max_steps", "3", "--out_dir", str(out), "--resume", folder, *FAST]) == \
        f"error: --resume {folder}: {reason}"


def test_resume_given_the_run_folder_takes_its_newest_complete_checkpoint(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    break_checkpoint(out / "checkpoint-000003", "missing rng")
    ckpt, state = C.find_checkpoint(run_args(tmp_path / "elsewhere", resume=str(out)), lambda line: None)
    assert (ckpt, state["step"]) == (str(out / "checkpoint-000002"), 2)


# metrics.jsonl cut short by a kill, or with garbage in it


def test_metrics_with_a_truncated_last_line_and_garbage_lines(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in range(1, 6)]
    text = "\n".join(lines[:2] + ["garbage", "[1, 2]", "\xff\xfe"] + lines[2:4]) + "\n" + lines[4][:9]
    (tmp_path / "metrics.jsonl").write_bytes(text.encode("latin-1"))
    with report.open_metrics(str(tmp_path), 4, True) as f:
        f.write(json.dumps({"step": 5, "loss": 0.25}) + "\n")
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": s, "loss": 0.5} for s in range(1, 5)] + [{"step": 5, "loss": 0.25}]
    path = tmp_path / "metrics.jsonl"
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {path}: its last line is cut short (a run killed mid-write); dropped",
        f"warning: {path}: dropped 3 unreadable line(s) (line 3, 4, 5)"]


def test_resume_with_a_truncated_metrics_line_end_to_end(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[:-20])  # the kill cut step 3's line
    train.main(["--max_steps", "3", "--out_dir", str(out), "--resume", str(out / "checkpoint-000003"), *FAST])
    assert f"warning: {out / 'metrics.jsonl'}: its last line is cut short (a run killed mid-write); dropped" \
        in capsys.readouterr().out.splitlines()
    assert read_steps(out) == [1, 2]  # nothing to replay: the run was at its end; no broken line left


# ---------------------------------------------------------------------------------------
# Saving: keep-N, and a crash at every point of a checkpoint's replacement


def save_step(out, tiny, step, version=0, keep=None):
    m, optimizer, scaler = tiny
    with torch.no_grad():
        next(m.unet.parameters()).fill_(step * 10 + version)
    C.save_checkpoint(str(out / f"checkpoint-{step:06d}"), m, optimizer, scaler,
                      dict(step=step, epoch=0, items_in_epoch=0, args={"model": "tiny"}, version=version), keep=keep)


@functools.lru_cache(None)
def first_parameter():
    return next(M.load_models("tiny", reference=False).unet.named_parameters())[0]


def marker(ckpt):
    """The value save_step / the saver wrote into the first parameter: step * 10 + version."""
    return load_file(os.path.join(ckpt, WEIGHTS))[first_parameter()].flatten()[0].item()


def test_keep_never_deletes_the_new_checkpoint_nor_later_ones(tmp_path, tiny):
    for step in (1, 3, 4, 35, 40):  # 35, 40: a later run's, as after --resume of an earlier checkpoint
        save_step(tmp_path, tiny, step)
    save_step(tmp_path, tiny, 5, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000004", "checkpoint-000005", "checkpoint-000035",
                                            "checkpoint-000040"]
    assert marker(tmp_path / "checkpoint-000005") == 50
    save_step(tmp_path, tiny, 6, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000006", "checkpoint-000035", "checkpoint-000040"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("scenario", ["re-save the same step", "save the next step, keep 1"])
def test_a_crash_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, tiny, monkeypatch, scenario):
    """Every rename, replace and delete of save_checkpoint in turn raises (a delete first removes
    one file: a kill mid-rmtree). After each: the newest complete checkpoint is the old one or the
    new one, whole; and the next save (the resumed run's) succeeds and cleans up."""
    real = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}
    new_step, new_version = (2, 1) if scenario.startswith("re-save") else (3, 0)
    k = 0
    while True:
        k += 1
        out = tmp_path / f"k{k}"
        os.makedirs(out)
        save_step(out, tiny, 1)
        save_step(out, tiny, 2)
        calls = [0]

        def op(name):
            def wrapped(path, *a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    if name == "rmtree" and os.path.isdir(path):  # cut short: one file gone
                        for root, _, files in os.walk(path):
                            if files:
                                os.remove(os.path.join(root, sorted(files)[0]))
                                break
                    raise Crash(f"{name} {path}")
                return real[name](path, *a, **kw)
            return wrapped
        for name in real:
            monkeypatch.setattr(os if name != "rmtree" else shutil, name, op(name))
        try:
            save_step(out, tiny, new_step, new_version, keep=1 if new_step == 3 else None)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        ckpt, state = C.latest_checkpoint(str(out))
        assert ckpt is not None, f"crash at operation {k}: no complete checkpoint"
        assert (state["step"], state["version"]) in ((2, 0), (new_step, new_version))
        assert marker(ckpt) == state["step"] * 10 + state["version"]
        if not crashed:
            assert (state["step"], state["version"]) == (new_step, new_version)
            assert k > 3  # the save did reach its renames and deletes
            break
        # the resumed run saves that step again: it works, whatever was left, and leaves no leftovers
        save_step(out, tiny, new_step, new_version, keep=1 if new_step == 3 else None)
        names = sorted(os.listdir(out))
        assert names == (["checkpoint-000001", "checkpoint-000002"] if new_step == 2 else ["checkpoint-000003"])
        assert C.latest_checkpoint(str(out))[1]["version"] == new_version


SAVER = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
import torch
from plumbing import checkpoint as C
import model as M
out = sys.argv[1]
m = M.load_models("tiny", reference=False)
params = list(m.unet.parameters())
optimizer = torch.optim.AdamW(params, lr=1e-3)
for p in params:
    p.grad = torch.ones_like(p)
optimizer.step()
scaler = torch.amp.GradScaler("cpu", enabled=False)
ckpt, state = C.latest_checkpoint(out)
step = state["step"] if state else 0
print("ready", step, flush=True)
while True:
    step += 1
    for version in range(1 + step % 2):  # odd steps are saved twice: the swap of a same-step re-save
        with torch.no_grad():
            params[0].fill_(step * 10 + version)
        C.save_checkpoint(os.path.join(out, f"checkpoint-{step:06d}"), m, optimizer, scaler,
                          dict(step=step, epoch=0, items_in_epoch=0, args={"model": "tiny"}, version=version), keep=2)
        print("saved", step, version, flush=True)
"""


def test_kill_9_at_random_moments_while_saving(tmp_path):
    """A process saves checkpoints in a loop (keep 2, every other step saved twice) and is killed
    with SIGKILL at a random moment, 5 times; each time the next one continues from what resume
    finds. After every kill: a complete checkpoint, at least as new as the last save that returned."""
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    out = tmp_path / "run"
    os.makedirs(out)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    last = (0, 0)
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(out), ROOT], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), proc.communicate()[1][-2000:]
        assert int(ready.split()[1]) == last[0]
        early = [proc.stdout.readline()] if kill == 0 else []  # a first checkpoint, before the first kill
        time.sleep(rng.uniform(0.05, 1.0))
        proc.kill()  # SIGKILL
        stdout, _ = proc.communicate()
        saved = [tuple(map(int, line.split()[1:])) for line in early + stdout.splitlines() if line.startswith("saved")]
        assert proc.returncode == -9
        last = max([last] + saved)
        ckpt, state = C.latest_checkpoint(str(out))
        assert ckpt is not None, f"seed {seed}, kill {kill}: no complete checkpoint in {sorted(os.listdir(out))}"
        found = (state["step"], state["version"])
        assert found >= last, f"seed {seed}, kill {kill}: {found} is older than the last finished save {last}"
        assert marker(ckpt) == state["step"] * 10 + state["version"]
        for name in ("optimizer.safetensors", "rng.safetensors"):
            load_file(os.path.join(ckpt, name))  # whole, not just its header
        last = (state["step"], 0)  # the next process continues from it (saving its next step)


# ---------------------------------------------------------------------------------------
# 3. --resume with other settings


@pytest.mark.parametrize("flags, named", [
    (["--resolution", "32"], "--resolution 16, not 32"),
    (["--data", "toy-base"], "--data toy, not toy-base"),
    (["--loss", "dpo"], "--loss rpo, not dpo"),
    (["--beta", "100"], "--beta 5000.0, not 100.0"),
    (["--tau", "0.1"], "--tau 0.5, not 0.1"),
    (["--rpo_weighting", "inside"], "--rpo_weighting outside, not inside"),
    (["--timesteps", "pair"], "--timesteps batch, not pair"),
    (["--embed", "text"], "--embed mean, not text"),
])
def test_resume_refuses_changed_settings(finished, flags, named, capsys):
    ckpt = str(finished / "checkpoint-000003")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    args = train.parse_args(["--out_dir", str(finished), *FAST, *flags])
    assert exit_message(check_resume_settings, args, ckpt, state) == (
        f"error: checkpoint {ckpt} was trained with {named} (pass --allow_changed_resume to continue anyway)")
    args.allow_changed_resume = True
    check_resume_settings(args, ckpt, state)
    was, new = named.split(", not ")
    assert f"note: continuing checkpoint {ckpt} (trained with {was}) with {was.split()[0]} {new}" in \
        capsys.readouterr().out.splitlines()


def test_resume_with_another_resolution_end_to_end(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    assert exit_message(train.main, ["--max_steps", "4", "--out_dir", str(out), "--resume", "--resolution", "32",
                                     *FAST]) == (
        f"error: checkpoint {out / 'checkpoint-000003'} was trained with --resolution 16, not 32 "
        f"(pass --allow_changed_resume to continue anyway)")
    assert read_steps(out) == [1, 2, 3]


def test_the_same_settings_spelled_differently_are_not_a_change(finished, tmp_path):
    ckpt = str(finished / "checkpoint-000003")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    check_resume_settings(train.parse_args(["--resolution", "16", *FAST]), ckpt, state)  # the preset's own
    dpo = dict(state, args=dict(state["args"], loss="dpo", timesteps="pair", tau=0.5, embed="mean"))
    check_resume_settings(train.parse_args(["--loss", "dpo", "--tau", "0.1", "--embed", "text", *FAST]), ckpt,
                            dpo)  # DPO has no tau and no embedding: nothing changed
    # a manifest named relative to the folder the run started in, resumed by its absolute path
    (tmp_path / "pairs.jsonl").write_text("")
    saved = dict(state, cwd=str(tmp_path), args=dict(state["args"], data="pairs.jsonl"))
    check_resume_settings(train.parse_args(["--data", str(tmp_path / "pairs.jsonl"), *FAST]), ckpt, saved)
    # ...while the same relative name from another folder is another file
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "pairs.jsonl").write_text("")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "b")
        msg = exit_message(check_resume_settings, train.parse_args(["--data", "pairs.jsonl", *FAST]), ckpt, saved)
    finally:
        os.chdir(cwd)
    assert msg == (f"error: checkpoint {ckpt} was trained with --data {tmp_path / 'pairs.jsonl'}, not "
                   f"{tmp_path / 'b' / 'pairs.jsonl'} (pass --allow_changed_resume to continue anyway)")


def test_model_stays_refused_and_init_needs_allow_changed_resume(finished, tmp_path):
    ckpt = str(finished / "checkpoint-000003")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    args = train.parse_args(["--init", str(finished / "unet"), *FAST])
    assert exit_message(check_resume_settings, args, ckpt, state) == (
        f"error: checkpoint {ckpt} was trained with --init None, not {finished / 'unet'} (pass "
        f"--allow_changed_resume to continue anyway)")
    args.allow_changed_resume = True  # (the same weights in another folder, say: a note; the shapes are checked later)
    notes = []
    check_resume_settings(args, ckpt, state, log=notes.append)
    assert notes == [f"note: continuing checkpoint {ckpt} (trained with --init None) with --init {finished / 'unet'}"]
    args = train.parse_args(["--model", "tiny-sd", "--allow_changed_resume", *FAST])
    assert exit_message(check_resume_settings, args, ckpt, state) == (
        f"error: checkpoint {ckpt} was trained with --model tiny, not tiny-sd")


@needs_wiring
def test_allow_changed_resume_end_to_end(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    train.main(["--max_steps", "4", "--out_dir", str(out), "--resume", "--beta", "100", "--allow_changed_resume",
                *FAST])
    lines = capsys.readouterr().out.splitlines()
    assert f"note: continuing checkpoint {out / 'checkpoint-000003'} (trained with --beta 5000.0) with --beta 100.0" \
        in lines
    assert lines[-1] == f"done: 4 steps; UNet in {out / 'unet'}"
    assert read_steps(out) == [1, 2, 3, 4]


def test_a_namespace_without_allow_flag_is_the_default(finished):
    args = argparse.Namespace(**vars(train.parse_args(["--beta", "1", *FAST])))
    ckpt = str(finished / "checkpoint-000003")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    assert "allow_changed_resume" in exit_message(check_resume_settings, args, ckpt, state)
