"""A hostile tester's cases for a run's life (issue #28): two runs into one --out_dir, a run and a
concurrent --resume of it, stale locks; links in OUT_DIR leading out of it; a --resume whose command
changes the optimizer's settings; checkpoints whose step, tensor names, shapes, dtypes or values
are wrong; non-finite weights; Ctrl-C and SIGTERM; a full disk; a hub data set without network.
Each ends in the outcome asserted: one line (and its exit code), the run's files as they were, or
a run that goes on from the newest checkpoint that is whole."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import loss as L
import model as M
import train
from conftest import finished_run
from plumbing import checkpoint as C
from plumbing import files, hub, pickapic, report, run_dir, speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]
WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run: checkpoint-000001..3, metrics.jsonl, unet/."""
    out = finished_run(tmp_path_factory, 3)
    return out


from test_hostile_checkpoint import check_resume_settings, read_steps, same_weights  # noqa: E402  (as there)


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def exit_of(fn, *a):
    with pytest.raises(SystemExit) as err:
        fn(*a)
    return err.value.code


def one_line(fn, *a):
    code = exit_of(fn, *a)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    return code


@pytest.fixture
def nothing_heavy(monkeypatch):
    """The models and the data must not load: a check that fails later fails the test."""
    import data

    def heavy(*a, **k):
        raise AssertionError("loaded the models or scanned the data before refusing")
    monkeypatch.setattr(M, "from_args", heavy)
    monkeypatch.setattr(data, "from_args", heavy)


# ---------------------------------------------------------------------------------------
# 1. One run writes an out_dir at a time

LOCKER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from plumbing import run_dir
run_dir.lock_out_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(out, tmp_path):
    """A process holding OUT's lock (as a run does), until killed."""
    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), ROOT], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline() == "locked\n"
    return proc


def in_use(out, pid):
    return (f"error: --out_dir {out} is in use by another run (pid {pid} on {socket.gethostname()}, started ",
            "); one run writes a folder at a time: wait for it to end, or choose another --out_dir")


def test_a_second_fresh_run_into_a_held_out_dir_stops_at_once(tmp_path, nothing_heavy):
    out = tmp_path / "run"
    holder = hold_lock(out, tmp_path)
    try:
        message = one_line(train.main, ["--max_steps", "2", "--out_dir", str(out), *FAST])
        start, end = in_use(out, holder.pid)
        assert message.startswith(start) and message.endswith(end)
        assert os.listdir(out) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_of_a_running_run_stops_at_once_and_its_log_is_whole(finished, tmp_path, nothing_heavy):
    out = copy_run(finished, tmp_path)
    metrics = (out / "metrics.jsonl").read_bytes()
    holder = hold_lock(out, tmp_path)
    try:
        message = one_line(train.main, ["--max_steps", "5", "--out_dir", str(out), "--resume", *FAST])
        assert message.startswith(in_use(out, holder.pid)[0])
        assert (out / "metrics.jsonl").read_bytes() == metrics
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_run_is_taken_over(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    holder = hold_lock(out, tmp_path)
    holder.kill()  # SIGKILL: the lock file stays, naming a dead process; the kernel dropped its flock
    holder.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    train.main(["--max_steps", "4", "--out_dir", str(out), "--resume", *FAST])
    assert capsys.readouterr().out.splitlines()[-1] == f"done: 4 steps; UNet in {out / 'unet'}"
    assert not (out / ".lock").exists()  # released at the end
    assert read_steps(out) == [1, 2, 3, 4]


def test_two_fresh_runs_started_together_one_trains_the_other_stops(tmp_path):
    """The tester's case as a user meets it: two train.py commands into one new --out_dir at once."""
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--max_steps", "3", "--save_every", "1", "--out_dir",
            str(out), *FAST]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 1]
    (_, done_out, _), (_, _, refused_err) = sorted(results, key=lambda r: r[0])
    assert done_out.splitlines()[-1] == f"done: 3 steps; UNet in {out / 'unet'}"
    assert "Traceback" not in refused_err
    lines = refused_err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out_dir {out} is in use by another run (pid "), lines
    assert read_steps(out) == [1, 2, 3] and sorted(os.listdir(out)) == [
        "README.md", "args.json", "checkpoint-000002", "checkpoint-000003", "metrics.jsonl", "unet"]


def test_without_flock_the_holders_pid_decides(tmp_path, monkeypatch):
    """A file system without flock (some network ones): a live holder on this host refuses, a dead
    one is taken over, one on another host refuses and says how to clear it."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    os.makedirs(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = dict(pid=sleeper.pid, host=socket.gethostname(), started="2025-01-01 00:00:00")
        (out / ".lock").write_text(json.dumps(record))
        assert one_line(run_dir.lock_out_dir, str(out)) == (
            f"error: --out_dir {out} is in use by another run (pid {sleeper.pid} on {socket.gethostname()}, started "
            f"2025-01-01 00:00:00); one run writes a folder at a time: wait for it to end, or choose another --out_dir")
        (out / ".lock").write_text(json.dumps(dict(record, host="elsewhere")))
        assert f"; if that run is gone, delete {out / '.lock'};" in one_line(run_dir.lock_out_dir, str(out))
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / ".lock").write_text(json.dumps(record))  # its holder is dead now
    run_dir.lock_out_dir(str(out))
    try:
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    finally:
        run_dir.unlock_out_dir(str(out))
    assert os.listdir(out) == []


def test_only_rank_0_takes_the_lock(tmp_path):
    run_dir.lock_out_dir(str(tmp_path / "run"), master=False)
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_no_folder_behind(tmp_path, nothing_heavy):
    """A run that made --out_dir and stopped before writing anything takes the empty folder away."""
    out = tmp_path / "new" / "run"
    (tmp_path / "new").mkdir()
    with pytest.raises(AssertionError, match="loaded the models"):
        train.main(["--max_steps", "1", "--out_dir", str(out), *FAST])
    assert os.listdir(tmp_path / "new") == []


# ---------------------------------------------------------------------------------------
# 2. Nothing is written through a link that leads out of OUT_DIR

@pytest.mark.parametrize("name", ["args.json", "README.md", "metrics.jsonl", "unet", "checkpoint-000004",
                                  "checkpoint-000004.tmp", "unet.tmp", "metrics.jsonl.part"])
def test_a_link_out_of_out_dir_is_refused_and_its_target_kept(finished, tmp_path, name, nothing_heavy):
    out = copy_run(finished, tmp_path)
    target = tmp_path / "elsewhere"
    if name in ("unet", "checkpoint-000004", "checkpoint-000004.tmp", "unet.tmp"):
        os.makedirs(target)
        (target / "mine.txt").write_text("keep")
    else:
        target.write_text("keep")
    if os.path.isdir(out / name):
        shutil.rmtree(out / name)
    elif os.path.exists(out / name):
        os.remove(out / name)
    os.symlink(target, out / name)
    for argv in (["--resume"], ["--overwrite"]):
        assert one_line(train.main, ["--max_steps", "5", "--out_dir", str(out), *argv, *FAST]) == (
            f"error: {out / name} is a symbolic link to {target}, outside --out_dir; a run writes only inside its "
            f"folder: remove the link")
    assert (target / "mine.txt" if target.is_dir() else target).read_text() == "keep"


def test_a_link_inside_out_dir_is_replaced_not_written_through(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.md").write_text("my notes")
    os.remove(out / "README.md")
    os.symlink("notes.md", out / "README.md")
    train.main(["--max_steps", "4", "--out_dir", str(out), "--resume", *FAST])
    assert (out / "notes.md").read_text() == "my notes"
    assert not os.path.islink(out / "README.md") and "# run" in (out / "README.md").read_text()


def test_write_atomic_replaces_a_link_and_never_writes_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    os.symlink(outside, tmp_path / "args.json")
    os.symlink(outside, tmp_path / "args.json.part")  # a leftover link where the new file is written first
    files.write_atomic(str(tmp_path / "args.json"), "{}")
    assert outside.read_text() == "keep"
    assert (tmp_path / "args.json").read_text() == "{}" and not os.path.islink(tmp_path / "args.json")
    assert not os.path.lexists(tmp_path / "args.json.part")


def test_a_save_and_an_export_replace_links_left_in_their_way(tmp_path):
    m = M.load_models("tiny", reference=False)
    optimizer = torch.optim.AdamW(m.unet.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    outside = tmp_path / "outside"
    os.makedirs(outside)
    out = tmp_path / "run"
    os.makedirs(out)
    for name in ("checkpoint-000001.tmp", "unet.tmp", "unet.old"):
        os.symlink(outside, out / name)
    C.save_checkpoint(str(out / "checkpoint-000001"), m, optimizer, scaler,
                      dict(step=1, epoch=0, items_in_epoch=0, args={"model": "tiny"}))
    C.export(str(out), str(out / "checkpoint-000001"), "unet")
    assert os.listdir(outside) == []
    assert sorted(os.listdir(out)) == ["checkpoint-000001", "unet"]


# ---------------------------------------------------------------------------------------
# 3. The command wins on --resume, and says so

def optimizer_for(args, m):
    params = [p for p in m.unet.parameters() if p.requires_grad]
    return M.make_optimizer("adamw", params, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                            args.weight_decay)


def test_resume_applies_the_commands_optimizer_settings(finished, tmp_path, capsys):
    """A seeded draw of settings each time: whatever the command says is in the optimizer's
    param_groups after the checkpoint's state is loaded, and the note names each change."""
    import random
    rng = random.Random(0)
    for trial in range(3):
        new = dict(lr=rng.choice([1e-3, 5e-5]), weight_decay=rng.choice([0.0, 0.1]), adam_beta1=rng.choice([0.8, 0.9]),
                   adam_beta2=rng.choice([0.99, 0.999]), adam_eps=rng.choice([1e-6, 1e-8]))
        argv = [x for k, v in new.items() for x in (f"--{k}", repr(v))]
        args = train.parse_args(["--out_dir", str(finished), "--resume", "--max_steps", "3", *FAST, *argv])
        speed.device_defaults(args, "cpu", real=False)  # ("auto" flags resolved, as train.py does)
        m = M.load_models("tiny", reference=False)
        optimizer = optimizer_for(args, m)
        capsys.readouterr()
        C.resume(args, m, optimizer, torch.amp.GradScaler("cpu", enabled=False), True, L.settings_of(args.loss),
                 M.PRESETS[args.model]["resolution"])
        group = optimizer.param_groups[0]
        assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
            new["lr"], new["weight_decay"], (new["adam_beta1"], new["adam_beta2"]), new["adam_eps"]), trial
        assert optimizer.state[group["params"][0]]["exp_avg"].abs().sum() > 0  # the moments are the checkpoint's
        saved = json.load(open(finished / "args.json"))
        changes = [f"--{k} {v} (was {saved[k]})" for k, v in new.items() if saved[k] != v]
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: the command")]
        assert lines == ([f"note: the command's settings replace the checkpoint's: {', '.join(changes)}"]
                         if changes else []), trial


def test_resume_with_new_settings_end_to_end_trains_with_them(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    train.main(["--max_steps", "4", "--out_dir", str(out), "--resume", "--weight_decay", "0", "--adam_eps", "1e-06",
                "--max_grad_norm", "0.5", *FAST])
    assert ("note: the command's settings replace the checkpoint's: --max_steps 4 (was 3), --max_grad_norm 0.5 "
            "(was 1.0), --weight_decay 0.0 (was 0.01), --adam_eps 1e-06 (was 1e-08)") in capsys.readouterr().out
    recorded = json.load(open(out / "args.json"))
    state = json.load(open(out / "checkpoint-000004" / "state.json"))
    assert recorded["weight_decay"] == 0.0 and recorded["adam_eps"] == 1e-6
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.0  # what trained is what args.json says
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-6


def test_resume_with_another_optimizer_is_refused(finished):
    ckpt = str(finished / "checkpoint-000003")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    args = train.parse_args(["--optimizer", "adafactor", *FAST])
    assert one_line(check_resume_settings, args, ckpt, state) == (
        f"error: checkpoint {ckpt} was trained with --optimizer adamw, not adafactor: its state is another optimizer's")


# ---------------------------------------------------------------------------------------
# 4. A checkpoint checks itself against its name and the model

def rewrite_weights(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def first_key(path):
    return next(iter(M.load_models("tiny", reference=False).unet.state_dict()))


def break_against_model(ckpt, how):
    """Break CKPT as HOW, keeping every file whole; returns the reason resume must give. The
    sha256 digests in its state.json are made again for the new bytes: these are checkpoints that
    were saved so (the checks after the bytes'), not files changed since."""
    reason = _break_against_model(ckpt, how)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(dict(state, sha256=C.folder_digests(str(ckpt)))))
    return reason


def _break_against_model(ckpt, how):
    weights = str(ckpt / WEIGHTS)
    name = "unet/diffusion_pytorch_model.safetensors"
    key = first_key(weights)
    if how == "another step in state.json":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps(dict(state, step=7)))
        return "state.json says step 7, its name step 3"
    if how == "int32 weights":
        rewrite_weights(weights, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))
        return f"{name}: {key} is I32, the model's F32"
    if how == "float16 weights":
        rewrite_weights(weights, lambda t: t.update({key: t[key].half()}))
        return f"{name}: {key} is F16, the model's F32"
    if how == "a tensor missing":
        rewrite_weights(weights, lambda t: t.pop(key))
        return f"{name} lacks {key} (1 missing, 0 unknown tensors)"
    if how == "a tensor renamed":
        rewrite_weights(weights, lambda t: t.update({"extra.weight": t.pop(key)}))
        return f"{name} lacks {key} (1 missing, 1 unknown tensors)"
    if how == "another shape":
        rewrite_weights(weights, lambda t: t.update({key: t[key].flatten()}))
        shape = list(load_file(str(ckpt.parent / "checkpoint-000002" / WEIGHTS))[key].shape)
        return f"{name}: {key} has shape [{torch.Size(shape).numel()}], the model's {shape}"
    if how == "nan weights":
        rewrite_weights(weights, lambda t: t[key].view(-1)[0].fill_(float("nan")))
        return "holds weights that are not finite (nan or inf)"
    if how == "optimizer state for another model":
        path = str(ckpt / "optimizer.safetensors")
        rewrite_weights(path, lambda t: t.update({"0.exp_avg": torch.zeros(3)}))
        shape = list(load_file(path)["0.exp_avg_sq"].shape)
        return f"optimizer.safetensors: 0.exp_avg is F32 [3], its parameter F32 {shape}"
    raise ValueError(how)


MISFITS = ["another step in state.json", "int32 weights", "float16 weights", "a tensor missing", "a tensor renamed",
           "another shape", "nan weights", "optimizer state for another model"]


@pytest.mark.parametrize("how", MISFITS)
def test_resume_walks_back_past_a_checkpoint_that_does_not_fit(finished, tmp_path, capsys, how):
    out = copy_run(finished, tmp_path)
    reason = break_against_model(out / "checkpoint-000003", how)
    train.main(["--max_steps", "3", "--out_dir", str(out), "--resume", *FAST])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"warning: skipping {out / 'checkpoint-000003'}: {reason}",
                         f"resumed from {out / 'checkpoint-000002'} at step 2"]
    assert lines[-1] == f"done: 3 steps; UNet in {out / 'unet'}"
    assert same_weights(out / "unet" / "diffusion_pytorch_model.safetensors", finished / "unet" /
                        "diffusion_pytorch_model.safetensors")  # step 3 replayed as the uninterrupted run made it


@pytest.mark.parametrize("how", ["another step in state.json", "int32 weights", "nan weights"])
def test_an_explicit_checkpoint_that_does_not_fit_is_one_line(finished, tmp_path, how):
    out = copy_run(finished, tmp_path)
    reason = break_against_model(out / "checkpoint-000003", how)
    folder = str(out / "checkpoint-000003")
    assert one_line(train.main, ["--max_steps", "4", "--out_dir", str(out), "--resume", folder, *FAST]) == \
        f"error: --resume {folder}: {reason}"


def test_a_checkpoint_copied_under_another_name_is_not_taken_for_that_step(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    shutil.copytree(out / "checkpoint-000002", out / "checkpoint-000009")
    ckpt, state = C.latest_checkpoint(str(out), log=print)
    assert (ckpt, state["step"]) == (str(out / "checkpoint-000003"), 3)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: skipping {out / 'checkpoint-000009'}: state.json says step 2, its name step 9"]


def test_an_init_unet_of_int32_weights_is_one_line(tmp_path):
    unet = M.load_models("tiny", reference=False).unet
    unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite_weights(str(weights), lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))
    key = next(iter(load_file(str(weights))))
    assert one_line(hub.load_unet, str(tmp_path / "unet")) == (
        f"error: --init {tmp_path / 'unet'}: {weights} holds {key} as I32, not floating-point weights")


# Non-finite weights are never saved


def test_weights_that_turn_nan_are_not_saved_and_the_last_good_checkpoint_is_named(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.learning_rate
    models = []
    monkeypatch.setattr(M, "from_args", lambda *a, real_from_args=M.from_args: models.append(real_from_args(*a))
                        or models[-1])

    def poisoned(args, step):  # after step 2 (saved): a weight turns nan, so the loss does
        if step == 2:
            with torch.no_grad():
                next(models[0][0].unet.parameters()).view(-1)[0] = float("nan")
        return real(args, step)
    monkeypatch.setattr(train, "learning_rate", poisoned)
    assert one_line(train.main, ["--max_steps", "5", "--save_every", "1", "--max_bad_steps", "1", "--out_dir",
                                 str(out), *FAST]) == (
        f"error: the trained weights are not finite (nan or inf) at step 2; they are not saved, the last good "
        f"checkpoint is {out / 'checkpoint-000002'} (step 2); try a lower --lr, and check the data and --init")
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-000001", "checkpoint-000002", "metrics.jsonl"]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-000002" / WEIGHTS)).values())


def test_a_nan_init_is_never_saved_as_a_finished_model(tmp_path):
    unet = M.load_models("tiny", reference=False).unet
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    unet.save_pretrained(tmp_path / "nan-unet")
    out = tmp_path / "run"
    assert one_line(train.main, ["--init", str(tmp_path / "nan-unet"), "--max_steps", "2", "--max_bad_steps", "2",
                                 "--out_dir", str(out), *FAST]) == (
        "error: the trained weights are not finite (nan or inf) at step 0; they are not saved, no checkpoint was "
        "saved; try a lower --lr, and check the data and --init")
    assert not any(n.startswith(("checkpoint-", "unet")) for n in os.listdir(out))


# ---------------------------------------------------------------------------------------
# 5. Ctrl-C, SIGTERM, a full disk: a checkpoint kept and one line

def signal_at(monkeypatch, step, signum):
    real = train.learning_rate

    def sending(args, s):
        if s == step:
            os.kill(os.getpid(), signum)
        return real(args, s)
    monkeypatch.setattr(train, "learning_rate", sending)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_saves_the_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys,
                                                                                  signum, code):
    out = tmp_path / "run"
    signal_at(monkeypatch, 1, signum)  # during step 2: it finishes, is saved, the run stops
    assert exit_of(train.main, ["--max_steps", "3", "--out_dir", str(out), *FAST]) == code
    name = signal.Signals(signum).name
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped by {name}: step 2 saved in {out / 'checkpoint-000002'}; continue with --resume")
    assert C.checkpoint_problem(str(out / "checkpoint-000002")) is None and read_steps(out) == [1, 2]
    assert not (out / ".lock").exists()
    assert signal.getsignal(signum) not in (None, signal.SIG_IGN) and "Stop" not in repr(signal.getsignal(signum))
    monkeypatch.undo()
    train.main(["--max_steps", "3", "--out_dir", str(out), "--resume", *FAST])
    train.main(["--max_steps", "3", "--out_dir", str(tmp_path / "straight"), *FAST])
    assert same_weights(out / WEIGHTS, tmp_path / "straight" / WEIGHTS) and read_steps(out) == [1, 2, 3]


def test_a_signal_before_training_stops_at_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(M, "from_args", lambda *a: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    assert exit_of(train.main, ["--max_steps", "3", "--out_dir", str(out), *FAST]) == 143
    assert capsys.readouterr().err.splitlines()[-1] == "stopped by SIGTERM before training began"
    assert not out.exists()  # the run made it, wrote nothing, took it away


def test_a_signal_on_a_saved_step_saves_nothing_twice(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_at(monkeypatch, 1, signal.SIGINT)
    saves = []
    real_save = C.save_checkpoint
    monkeypatch.setattr(C, "save_checkpoint", lambda path, *a, **k: saves.append(path) or real_save(path, *a, **k))
    assert exit_of(train.main, ["--max_steps", "3", "--save_every", "2", "--out_dir", str(out), *FAST]) == 130
    assert saves == [str(out / "checkpoint-000002")]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped by SIGINT: step 2 saved in {out / 'checkpoint-000002'}; continue with --resume")


def test_a_second_signal_stops_at_once():
    stop = run_dir.Stop()
    stop.in_loop = True
    stop.handler(signal.SIGINT, None)
    stop.handler(signal.SIGTERM, None)  # (torchrun's answer to Ctrl-C, to its workers: not "again")
    assert stop.signum == signal.SIGINT
    with pytest.raises(SystemExit) as err:
        stop.handler(signal.SIGINT, None)
    assert err.value.code == 130


def test_ctrl_c_in_the_cli_is_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--max_steps", "100000", "--out_dir",
                             str(out), *FAST], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (os.path.exists(out / "metrics.jsonl") and os.path.getsize(out / "metrics.jsonl")):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = err.splitlines()[-1]
    assert line.startswith("stopped by SIGINT: step ") and line.endswith("; continue with --resume")
    step = int(line.split("step ")[1].split()[0])
    assert C.latest_checkpoint(str(out))[1]["step"] == step and read_steps(out) == list(range(1, step + 1))


@pytest.mark.parametrize("where", ["checkpoint", "metrics line", "args.json"])
def test_a_full_disk_keeps_the_last_checkpoint_and_is_one_line(tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "checkpoint":  # the second save fails in its optimizer file
        calls = []
        real = C.save_file

        def save_file_(tensors, path, *a, **k):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(tensors, path, *a, **k)
        monkeypatch.setattr(C, "save_file", save_file_)
        message = one_line(train.main, ["--max_steps", "3", "--save_every", "1", "--out_dir", str(out), *FAST])
        assert message == (f"error: cannot write in {out}: No space left on device "
                           f"({out / 'checkpoint-000002.tmp' / 'optimizer.safetensors'}); the last complete checkpoint, "
                           f"{out / 'checkpoint-000001'} (step 1), is intact: free space, then --resume")
        assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000001"]
        assert C.checkpoint_problem(str(out / "checkpoint-000001")) is None
    elif where == "metrics line":
        real_open = report.open_metrics

        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, text):
                raise full

            def __getattr__(self, name):
                return getattr(self.f, name)
        monkeypatch.setattr(report, "open_metrics", lambda *a: Full(real_open(*a)))
        assert one_line(train.main, ["--max_steps", "3", "--out_dir", str(out), *FAST]) == (
            f"error: cannot write in {out}: No space left on device; no checkpoint was saved yet")
    else:
        def write_atomic(path, text):
            raise full
        monkeypatch.setattr(files, "write_atomic", write_atomic)
        assert one_line(train.main, ["--max_steps", "3", "--out_dir", str(out), *FAST]).startswith(
            f"error: cannot write in {out}: No space left on device")
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------
# 6. A hub data set without network: one line in seconds


def test_a_hub_data_set_without_network_fails_in_seconds(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if hub.unreachable("someone/pairs") is None:
        pytest.skip("the hub answers from here")
    t0 = time.time()
    with pytest.raises(SystemExit) as err:
        pickapic.open_pairs("hf:someone/pairs")
    assert time.time() - t0 < 5
    assert err.value.code.startswith("error: cannot stream the data set 'someone/pairs' (hub unreachable: ")
    assert "\n" not in err.value.code


def test_a_hub_that_does_not_answer_is_unreachable(monkeypatch):
    """No network at all, or packets dropped: the client's timeout (its own exception classes)."""
    from huggingface_hub import HfApi, constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    ConnectTimeout = type("ConnectTimeout", (Exception,), {})
    seen = {}

    def repo_info(self, repo, repo_type=None, timeout=None):
        seen["timeout"] = timeout
        raise ConnectTimeout("timed out")
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert hub.unreachable("someone/pairs") == "timed out" and seen["timeout"] <= 5
    RepositoryNotFoundError = type("RepositoryNotFoundError", (Exception,), {})
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: (_ for _ in ()).throw(RepositoryNotFoundError("404")))
    assert hub.unreachable("someone/pairs") is None  # the hub answered: the loader says what it said
