"""Hostile input for the multi-process path and the benchmarks: two tiny gloo processes on the CPU.

A rank that stops or fails must not cost rank 0's checkpoint (torchrun stops every rank left as
soon as one exits), a signal one rank gets must stop every rank alike, and the benchmarks append
their rows to nothing but a file of their rows.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--batch_size", "2", "--num_items", "8", "--no_progress", "--log_every", "1"]

# train.py with a checkpoint that takes SLOW seconds to write (as a real model's does), and one
# rank sending itself a signal once metrics.jsonl holds LINES lines
WRAPPER = """
import os, signal, sys, threading, time
sys.path.insert(0, {root!r})
from plumbing import checkpoint as C
write = C.save_checkpoint

def slow(*a, **k):
    time.sleep({slow})
    return write(*a, **k)

def signal_at(path, lines):
    while True:
        try:
            with open(path) as f:
                if sum(1 for _ in f) >= lines:
                    return os.kill(os.getpid(), signal.{sig})
        except OSError:
            pass
        time.sleep(0.02)

C.save_checkpoint = slow
if os.environ["RANK"] == "{rank}":
    threading.Thread(target=signal_at, args=({metrics!r}, {lines}), daemon=True).start()
import train
train.main()
"""


def launch(cmd, timeout):
    """torchrun's command -> (exit code, stdout, stderr); on a timeout the test fails, its launcher
    and workers killed (torchrun starts each worker in a session of its own: killed one by one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                workers = [int(w) for w in f.read().split()]
        except OSError:
            workers = []
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail("torchrun hung:\n" + stdout[-3000:] + stderr[-3000:])
    return p.returncode, stdout, stderr


def torchrun(*argv, script="train.py", timeout=120):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   *argv], timeout)


def torchrun_signalled(tmp_path, rank, sig, lines, max_steps, slow=3):
    out = tmp_path / "run"
    script = tmp_path / "signalled_train.py"
    script.write_text(WRAPPER.format(root=ROOT, slow=slow, sig=sig, rank=rank, lines=lines,
                                     metrics=str(out / "metrics.jsonl")))
    code, stdout, stderr = torchrun(*TINY, "--max_steps", str(max_steps), "--out_dir", str(out), script=script,
                                    timeout=180)
    return out, stdout, stderr


@pytest.mark.parametrize("rank, sig", [(0, "SIGTERM"), (1, "SIGINT")])
def test_a_signal_to_one_rank_in_the_loop_saves_and_stops_every_rank_alike(tmp_path, rank, sig):
    # Before: the rank that had no signal left the save at once and exited, torchrun stopped rank 0
    # while it wrote (SIGTERM to rank 0: no checkpoint, and a false "again: at once" line); rank 0
    # named SIGTERM whatever the signal was.
    out, stdout, stderr = torchrun_signalled(tmp_path, rank, sig, lines=2, max_steps=60)
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig}: step "), stderr[-3000:]
    step = int(lines[0].split("step ")[1].split()[0])
    state = json.load(open(out / f"checkpoint-{step:06d}" / "state.json"))
    assert state["step"] == step >= 2 and "again" not in stderr
    code = str(128 + getattr(signal, sig))
    assert stderr.count(f"exitcode  : {code}") >= 1 and "exitcode  : 0" not in stderr


def test_a_signal_to_rank_1_during_the_final_save_stops_rank_0_too(tmp_path):
    # Before: rank 0 ended with exit 0 and "done", rank 1 with 143 and no word: torchrun reported a
    # failure no line explained.
    out, stdout, stderr = torchrun_signalled(tmp_path, 1, "SIGTERM", lines=3, max_steps=3)
    assert "stopped by SIGTERM: it came after the last step; the final save and export finished: step 3" in stderr, \
        stderr[-3000:]
    assert "done: 3 steps" in stdout and (out / "unet").is_dir() and (out / "checkpoint-000003").is_dir()
    assert "exitcode  : 0" not in stderr


def test_a_rank_killed_in_the_loop_ends_the_others_in_one_line(tmp_path):
    # Before: rank 0's collective failed with a traceback of the autograd engine and gloo's message.
    out, stdout, stderr = torchrun_signalled(tmp_path, 1, "SIGKILL", lines=3, max_steps=60, slow=0)
    line = next((x for x in stderr.splitlines() if x.startswith("error: another rank")), "")
    assert line.startswith("error: another rank of this run ended or stopped answering (") and \
        "the last complete checkpoint" not in line and "no checkpoint was saved yet" in line, stderr[-3000:]
    assert "[rank0]: Traceback" not in stderr and "[rank0]" not in stderr


def test_bench_rows_go_only_to_a_file_of_rows(tmp_path, capsys):
    from bench import e2e, profile, speed
    user = tmp_path / "notes.json"
    user.write_text('{"mine": 1}\n')
    profiled = ["--profile_out", str(user), "--max_steps", "4", "--out_dir", str(tmp_path / "p")]
    for main, argv in ((speed.parse_args, ["--out", str(user)]), (e2e.main, ["--dry", "--out", str(user)]),
                       (profile.main, profiled)):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        said = capsys.readouterr().err + str(stop.value.code)
        assert f"{user} exists and is not a file of this benchmark's JSON rows" in said, said
    assert user.read_text() == '{"mine": 1}\n' and not (tmp_path / "p").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"model": "tiny", "ms_per_step": 1.0}\n')
    assert speed.parse_args(["--out", str(rows)]).out == str(rows)  # an earlier file of rows: appended to


def test_profile_with_no_step_after_the_warm_up_stops_before_training(tmp_path):
    from bench import profile
    with pytest.raises(SystemExit, match="error: profile: --max_steps 2 leaves no step after the 2 warm-up steps"):
        profile.main(["--max_steps", "2", "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_flag_error_under_torchrun_is_said_once(tmp_path):
    # Before: every rank printed argparse's usage text and the line (8 GPUs: 8 of each).
    code, _, stderr = torchrun(*TINY, "--fsdp", "--lora_rank", "4", "--out_dir", str(tmp_path / "run"))
    assert code != 0 and stderr.count("usage: train.py") == 1, stderr[-3000:]
    assert stderr.count("train.py: error: --fsdp shards a full fine-tune") == 1 and "exitcode  : 2" in stderr


def test_a_resume_on_another_number_of_processes_says_what_changes(tmp_path, capsys):
    # Before: a 2-process checkpoint of --batch_size 2 (without --global_contrast: two contrasts of 2
    # pairs) resumed on one process with --batch_size 4 (one contrast of 4) said nothing of it.
    import train
    out = tmp_path / "run"
    train.main([*TINY, "--max_steps", "1", "--save_every", "1", "--out_dir", str(out)])
    state_file = out / "checkpoint-000001" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(dict(state, world_size=2)))  # (as 2 ranks of --batch_size 2 write it)
    capsys.readouterr()
    train.main([*TINY, "--max_steps", "2", "--batch_size", "4", "--out_dir", str(out), "--resume"])
    said = capsys.readouterr().out
    assert "(written by 2 process(es), continued by 1)" in said
    assert "note: the global micro-batch was 4 pairs (--batch_size × processes), now 4; one contrast spanned 2 pairs, " \
           "now 4" in said


def test_too_many_bad_steps_under_torchrun_is_one_line_with_the_checkpoint(tmp_path):
    # Before: every rank printed the line (and the rank that left first got rank 0 stopped mid-save).
    out = tmp_path / "run"
    code, _, stderr = torchrun(*TINY, "--max_steps", "6", "--lr", "1e30", "--max_bad_steps", "2", "--out_dir", str(out))
    lines = [x for x in stderr.splitlines() if x.startswith("error: 2 bad steps in a row")]
    assert code != 0 and len(lines) == 1, stderr[-3000:]
    assert (out / lines[0].split("saved in ")[1].split(";")[0].split("/")[-1] / "state.json").is_file()


def test_ranks_that_read_different_data_stop_in_one_line(tmp_path):
    # Before: a rank whose copy of the data lacked one image dealt other epochs, and the ranks'
    # collectives waited for each other until torchrun was killed (a hang).
    from PIL import Image
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        with open(tmp_path / copy / "pairs.jsonl", "w") as f:
            for i in range(8):
                for side, colour in (("w", (200, 40, 40)), ("l", (40, 40, 200))):
                    if not (copy == "b" and i == 5 and side == "l"):  # copy b lacks one image
                        Image.new("RGB", (16, 16), colour).save(tmp_path / copy / f"{i}{side}.png")
                f.write(json.dumps({"prompt": f"thing {i}", "winner": f"{i}w.png", "loser": f"{i}l.png"}) + "\n")
    script = tmp_path / "other_copy_train.py"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nif os.environ['RANK'] == '1':\n"
                      f"    sys.argv = [x.replace({a!r}, {b!r}) for x in sys.argv]\nimport train\ntrain.main()\n")
    spec = str(tmp_path / "a" / "pairs.jsonl")
    code, _, stderr = torchrun(*TINY, "--resolution", "16", "--max_steps", "6", "--data", spec, "--out_dir",
                               str(tmp_path / "run"), script=script, timeout=90)
    lines = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert code != 0 and lines == [f"error: the ranks read different data from --data {spec} (rank 0: 8 pairs; rank 1: "
                                   f"7 pairs, skipped {{'missing_image': 1}}); every rank must read the same files (on "
                                   f"several nodes: the same copy at the same path)"], stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
