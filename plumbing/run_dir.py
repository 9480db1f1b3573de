"""
The run folder's rules, around checkpoint.py's saves: what makes OUT_DIR one run's, from the
moment train.main starts to the moment it ends.

- One run writes an OUT_DIR at a time: it holds OUT_DIR/.lock for its whole life (an flock,
  filelock's, released by the kernel when the process ends however it ends; where the file system
  has no flock, the holder's pid decides). A second run stops at once, in one line naming the holder.
- A fresh run never writes into another run (check_out_dir): not into a folder that holds one
  (--resume continues it, --overwrite deletes it once the new run's data and models have loaded), nor into the user's own files, nor
  through a symbolic link out of the folder.
- Ctrl-C and SIGTERM stop the run at the end of a step, with a checkpoint (Stop, save_on_stop).
- A full disk, or a file system turned read-only, ends the run in one line; the last complete
  checkpoint stays (write_failure). So does, under torchrun, another rank's end (parallel.peer_lost).

guarded_run is the frame train.main runs in; lock_out_dir and check_out_dir come first inside it.
"""
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time

import filelock

from plumbing import checkpoint as C
from plumbing import distributed as D
from plumbing import files, lora, parallel


# ---------------------------------------------------------------------------------------
# The frame of a run
@contextlib.contextmanager
def guarded_run(out_dir):
    """train.main's run: SIGINT/SIGTERM handled (Stop), a full disk while writing turned into one
    line (write_failure), OUT_DIR's lock released at the end whatever happens."""
    with Stop() as stop:
        try:
            yield stop
        except OSError as err:
            line = write_failure(out_dir, err)
            if line is None:
                raise
            raise SystemExit(line)
        except RuntimeError as err:  # under torchrun: another rank gone (killed, out of memory, its node lost)
            if not parallel.peer_lost(err):
                raise
            raise SystemExit(f"error: another rank of this run ended or stopped answering ({parallel.peer_lost(err)}); this "
                             f"one stops too: {kept_words(out_dir, 'continue with --resume')}")
        finally:
            unlock_out_dir(out_dir)


def _agree(problem, master):
    """Rank 0's verdict (a one-line error or None) made every rank's: all stop or none."""
    if D.active() and not D.all_ranks(problem is None, D.sync_device()):
        raise SystemExit(problem or 1)  # (other ranks: rank 0 prints the line)
    if problem:
        raise SystemExit(problem)


# ---------------------------------------------------------------------------------------
# One run writes an OUT_DIR at a time
LOCK_NAME = ".lock"
_held = {}  # OUT_DIR's real path -> (its FileLock, None without flock; the lock's path; whether the run made OUT_DIR)
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}  # flock's "not here"


def lock_out_dir(out_dir, master=True):
    """Make OUT_DIR (if need be) and hold OUT_DIR/.lock until unlock_out_dir or the end of the
    process: a second run, or a --resume of a running one, stops at once with one line naming the
    holder. The lock is an flock (filelock's), so a run killed by any means leaves no lock behind
    (its .lock file stays, naming it, and the next run takes it over). Where the file system has no
    flock, the holder's pid is checked instead (on the same host). Under torchrun rank 0 takes it."""
    problem = None
    if master:
        try:
            problem = _lock(out_dir)
        except OSError as err:
            problem = f"error: cannot lock --out_dir {out_dir}: {err.strerror}"
    _agree(problem, master)


def _holder_words(path):
    """The holder's record in the lock file, as words (it may be writing it: a few tries)."""
    for _ in range(20):
        info, _ = C.read_json(path)
        if isinstance(info, dict):
            return info, f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        time.sleep(0.05)
    return None, "a run that has not written who it is"


def _in_use(out_dir, words, note=""):
    return (f"error: --out_dir {out_dir} is in use by another run ({words}){note}; one run writes a folder at a "
            f"time: wait for it to end, or choose another --out_dir")


def _lock(out_dir):
    key = os.path.realpath(out_dir)
    if key in _held:
        return _in_use(out_dir, f"pid {os.getpid()}, this process")
    made = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    while True:
        if files.link_out_of(path, out_dir) or os.path.isdir(path):
            return f"error: {path} is not the lock file a run keeps there (a link or a folder): remove it"
        # filelock's flock, tried once (blocking=False). It opens the file without following a link
        # and keeps what the holder wrote in it; it takes the lock only on the file still at PATH (a
        # holder may delete it between the open and the flock). preserve_lock_file: unlock_out_dir
        # deletes it, while still holding it; fallback_to_soft=False: where flock is missing, its
        # own marker file would not name the holder as the line below does, so the pid decides here.
        lock = filelock.FileLock(path, blocking=False, thread_local=False, fallback_to_soft=False,
                                 preserve_lock_file=True)
        try:
            lock.acquire()
            break
        except filelock.Timeout:  # (before OSError: a Timeout is a TimeoutError)
            if os.path.lexists(path):
                return _in_use(out_dir, _holder_words(path)[1])
            # the holder let go (deleted the file) between filelock's open and its flock: try again
        except OSError as err:  # no flock here (some network file systems)
            if err.errno not in NO_FLOCK:
                raise
            lock = None
            info, words = _holder_words(path) if os.path.isfile(path) and os.path.getsize(path) else (None, "")
            if isinstance(info, dict) and info.get("pid") != os.getpid():
                if info.get("host") != socket.gethostname():
                    return _in_use(out_dir, words, f"; if that run is gone, delete {path}")
                if _alive(info.get("pid")):
                    return _in_use(out_dir, words)
            break
    # who holds it, for the line a second run prints (through a descriptor of our own that follows
    # no link; the file at PATH is the one locked, or without flock the one just checked)
    record = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command=" ".join(sys.argv))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _held[key] = (lock, path, made)
    return None


def _alive(pid):
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def unlock_out_dir(out_dir):
    """Let OUT_DIR go: its .lock is deleted (while still held, so no one can take the old file)
    and, when this run made OUT_DIR and left nothing in it, the folder too."""
    held = _held.pop(os.path.realpath(out_dir), None)
    if held is None:
        return
    lock, path, made = held
    try:
        os.remove(path)
        removed = True
    except OSError:  # (Windows deletes no file that is open: after the release, below)
        removed = False
    if lock is not None:
        lock.release()
    if not removed:
        try:
            os.remove(path)
        except OSError:
            pass
    if made:
        try:
            os.rmdir(out_dir)  # (only when empty)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# A fresh run into a folder that holds one (check_out_dir)
def run_files(out_dir):
    """What OUT_DIR holds of a run: [names], the newest checkpoint first."""
    found = [os.path.basename(p) for _, p in C.checkpoint_folders(out_dir)]
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isdir(metrics) or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        found.append("metrics.jsonl")  # (an empty one: a run that stopped before its first step)
    found += [name for name in ("unet", "lora", "validation", "logs") if os.path.isdir(os.path.join(out_dir, name))]
    if os.path.isfile(os.path.join(out_dir, lora.LORA_FILE)):  # (a LoRA run's copy for load_lora_weights(OUT_DIR))
        found.append(lora.LORA_FILE)
    if os.path.isfile(os.path.join(out_dir, "args.json")):  # plumbing/report.py's: the flags, and the model card beside them
        found += ["args.json"] + (["README.md"] if os.path.isfile(os.path.join(out_dir, "README.md")) else [])
    return found


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_out_dir(args, master):
    """Before a run: a fresh one (no --resume) must not write into an OUT_DIR that holds another
    run's checkpoints or log (its keep-N clean-up, its metrics.jsonl, its final export would mix
    with or destroy them). With --overwrite, that run's checkpoint-* folders, metrics.jsonl,
    unet/, lora/, validation/, logs/, args.json and model card are deleted (nothing else), by
    make_out_dir, once the data and models have loaded: a mistake in them never costs that run.
    Nothing the run writes may be a symbolic link out of OUT_DIR, nor a file where it writes a folder
    (or the reverse). Rank 0 decides; every rank calls it. Returns the names make_out_dir deletes."""
    again = False
    if args.resume == "latest" and not getattr(args, "overwrite", False) and not C.checkpoint_folders(args.out_dir):
        # as diffusers' scripts: nothing to resume yet, a new run starts. When the folder holds
        # this command's own run, killed before its first checkpoint, that run starts over (a
        # scheduler that reruns the command with --resume must not fail forever).
        again = bool(run_files(args.out_dir)) and own_partial_run(args)
        if master:
            print(f"--resume latest: no checkpoint in {args.out_dir} yet; " + (
                "its files are this command's own run, stopped before its first checkpoint: starting it again"
                if again else "starting a new run"))
        args.resume = None
    doomed = run_files(args.out_dir) if master and not args.resume and (getattr(args, "overwrite", False) or again) else []
    _agree(_check_out_dir(args, again, doomed) if master else None, master)
    return doomed


def _check_out_dir(args, again, doomed):
    out = args.out_dir
    return (files.folder_problem(out, "--out_dir") or _links_problem(out) or _foreign_problem(args)
            or _run_problem(args, again) or _kinds_problem(args, doomed))


def make_out_dir(args, doomed, master):
    """OUT_DIR made, and the run in it that --overwrite replaces (check_out_dir's `doomed`) deleted:
    the log, the exported weights, then the checkpoints (a kill midway: the next --overwrite ends it).
    Every rank calls it, once the data and models have loaded."""
    problem = None
    if master:
        try:
            for path in sorted((os.path.join(args.out_dir, f) for f in doomed),
                               key=lambda p: (not p.endswith("metrics.jsonl"), "checkpoint-" in p)):
                C.remove(path)
            if doomed:
                print(f"{'--overwrite' if getattr(args, 'overwrite', False) else '--resume'}: deleted the run in "
                      f"{args.out_dir} ({', '.join(doomed)})")
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as err:
            problem = f"error: cannot clear --out_dir {args.out_dir}: {err.strerror}: {err.filename}"
    _agree(problem, master)


def _foreign_problem(args):
    """A run writes only into an empty folder or its own run: a folder that holds something and no
    run (the user's own README.md, say, which the model card would replace) is refused."""
    if run_files(args.out_dir):
        return None  # (a run: _run_problem's rules)
    try:
        names = sorted(os.listdir(args.out_dir))
    except OSError:
        return None  # (no folder yet)
    foreign = [n for n in names if not _runs_name(n) or n == "README.md"]  # (a run's card comes with its args.json)
    if not foreign:
        return None
    return (f"error: --out_dir {args.out_dir} holds files that are not a run's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); a run writes only into an empty folder or its own run: choose "
            f"another --out_dir")


# The settings a run resolves after its folder is checked (speed.device_defaults: "auto"; --scale_lr's lr)
RESOLVED_LATER = ("mixed_precision", "optimizer", "sdpa_backend", "compile", "gradient_checkpointing", "num_workers")


def own_partial_run(args):
    """Whether OUT_DIR's args.json (a run with no checkpoint: killed before its first) is this
    command's: every setting it records that this command also sets is the same, but where the
    run writes and how it reports (checkpoint.QUIET_KEYS), and settings resolved later from "auto"."""
    saved, _ = C.read_json(os.path.join(args.out_dir, "args.json"))
    if not isinstance(saved, dict):
        return False
    now = json.loads(json.dumps(vars(args), default=str))
    skip = set(C.QUIET_KEYS) | {k for k in RESOLVED_LATER if now.get(k) == "auto"} | ({"lr"} if now.get("scale_lr") else set()) \
        | ({"max_steps"} if now.get("max_steps") is None else set())  # (--num_train_epochs: resolved with the data)
    return all(now[k] == v for k, v in saved.items() if k in now and k not in skip)


# What a run writes at the top of OUT_DIR (and leftovers: NAME.tmp, NAME.part, NAME.old), and of which kind
RUN_ENTRIES = {"args.json": "file", "README.md": "file", "metrics.jsonl": "file", "unet": "folder", "lora": "folder",
               "logs": "folder", "wandb": "folder", "validation": "folder"}


def _runs_name(name):
    return bool(C.CHECKPOINT_NAME.match(name)) or name == LOCK_NAME or any(
        name == e or name.startswith(e + ".") for e in RUN_ENTRIES)


def _links_problem(out):
    """A symbolic link among the names the run writes that leads out of OUT_DIR: writing it would
    change a file elsewhere (a link inside the folder is harmless)."""
    try:
        names = sorted(os.listdir(out))
    except OSError:
        return None  # (no folder yet: nothing in it)
    for name in filter(_runs_name, names):
        target = files.link_out_of(os.path.join(out, name), out)
        if target:
            return (f"error: {os.path.join(out, name)} is a symbolic link to {target}, outside --out_dir; a run "
                    f"writes only inside its folder: remove the link")
    return None


def _kinds_problem(args, doomed=()):
    """A file where the run writes a folder (or the reverse): it would fail after the models load
    (one that --overwrite deletes, `doomed`, is no problem)."""
    needed = dict(RUN_ENTRIES)
    for name, tracker in (("logs", "tensorboard"), ("wandb", "wandb")):
        if getattr(args, "report_to", None) != tracker:
            needed.pop(name)
    if not getattr(args, "validation_prompts", None):
        needed.pop("validation")
    for name, kind in needed.items():
        path = os.path.join(args.out_dir, name)
        if name not in doomed and os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
            return (f"error: {path} is a {'folder' if kind == 'file' else 'file'}; the run writes its {name} "
                    f"{kind} there: move it away")
    return None


def _run_problem(args, again=False):
    out, overwrite = args.out_dir, getattr(args, "overwrite", False) or again
    if args.resume:
        if overwrite:
            return "error: --overwrite starts over and --resume continues: pass one of them"
        if args.resume == "latest" and getattr(args, "max_steps", None) is not None:
            ckpt, state = C.latest_checkpoint(out)  # (headers only: cheap, before anything loads)
            return C.past_the_end(ckpt, state, args.max_steps)
        return None
    found = run_files(out)
    if not found:
        return None
    if not overwrite:
        checkpoints = [f for f in found if f.startswith("checkpoint-")]
        shown = ", ".join(checkpoints[:1] + [f for f in found if not f.startswith("checkpoint-")][:1])
        if checkpoints:
            return (f"error: {out} holds a run ({shown}); continue it with --resume, or pass --overwrite to start "
                    f"over (its checkpoints and metrics are deleted)")
        return (f"error: {out} holds a run ({', '.join(found)}) with no checkpoint to continue; pass --overwrite "
                f"to start over (its metrics and weights are deleted), or choose another --out_dir")
    doomed = [os.path.join(out, f) for f in found]
    for flag in ("init", "pretrained", "data", "embed_model"):
        value = getattr(args, flag, None)
        if isinstance(value, str):
            path = value.split(":", 1)[1] if value.startswith(("cache:", "pickapic:")) else value
            hit = next((d for d in doomed if os.path.exists(path) and _inside(path, d)), None)
            if hit:
                return (f"error: --{flag} {value} lies in {hit}, which --overwrite would delete; "
                        f"move it out first or choose another --out_dir")
    return None  # (make_out_dir deletes `doomed` once the data and models have loaded)


# ---------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop at the end of the step, with a checkpoint
class Stop:
    """SIGINT and SIGTERM handlers for a run. Before the loop (models loading, data scanning) a
    signal stops at once; in the loop it is noted, and the loop stops after the step it is in,
    saves a checkpoint and exits (stop_now). The same signal again stops at once: a checkpoint
    being written at that moment is left for the next resume to walk back from. After the loop
    (`ending`: "saving" the final checkpoint, then its path while the export runs) a signal is
    noted too: the save and export finish, and `finish` says so and exits with its code."""
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signum, self.in_loop, self.previous, self.ending, self.exiting = None, False, {}, None, False

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():  # (handlers can be set there only)
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    self.previous[name] = signal.signal(getattr(signal, name), self.handler)
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def handler(self, signum, frame):
        # (another signal after the first is not "again": torchrun answers Ctrl-C by sending its
        # workers SIGTERM, and they should still finish the step and save. Once this process is
        # ending with its code (stop_now), a signal changes nothing: under torchrun it is the
        # launcher stopping the ranks still there after one ended, not the user)
        if self.exiting:
            return
        if self.signum == signum or not self.in_loop:
            if os.environ.get("RANK", "0") == "0":  # (under torchrun rank 0 says it)
                print(f"stopped by {signal.Signals(signum).name} {self._at_once()}", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = self.signum or signum

    def _at_once(self):
        """What a signal that stops at once leaves, in words."""
        if not self.in_loop:
            return "before training began"
        if self.ending is None:
            return "again: at once, this step not saved"
        if self.ending == "saving":
            return ("again: at once, during the final save; --resume continues from the last complete checkpoint "
                    "(a partial one is walked past)")
        return (f"again: at once, after the final checkpoint was saved in {self.ending}; the export beside it may be "
                f"unfinished: --resume finishes it")

    def finish(self, line, master):
        """At the very end: a signal noted during the final save and export, by any rank, stops
        every rank now that they are done, with its line and exit code (the run is complete).
        Under torchrun every rank calls it (a collective: the ranks agree)."""
        if (D.largest(self.signum or 0, D.sync_device()) if D.active() else self.signum):
            self.stop_now(f"it came after the last step; the final save and export finished: {line}", master)

    def stop_now(self, line, master):
        """The one line (rank 0's) and the exit code of the signal: 130 for SIGINT, 143 for SIGTERM.
        Under torchrun every rank calls it, and all take the signal one of them got."""
        self.exiting = True
        self.signum = D.largest(self.signum or 0, D.sync_device()) if D.active() else self.signum
        signum = self.signum or signal.SIGTERM
        if master:
            print(f"stopped by {signal.Signals(signum).name}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def save_on_stop(args, step, start, save):
    """The checkpoint of a run stopped by a signal at STEP (START: where this process began): saved
    unless no step finished since START or --save_every saved this step already -> the stop line."""
    path = os.path.join(args.out_dir, f"checkpoint-{step:06d}")
    if step == start:
        return f"no step finished since {'the start' if not step else f'step {step}'}; nothing new to save"
    if not (args.save_every and step % args.save_every == 0):
        save(path, keep=args.keep_checkpoints)
    return f"step {step} saved in {path}; continue with --resume"


# ---------------------------------------------------------------------------------------
# A disk that fills, a file system that turns read-only: the run's files stay as the last
# complete save left them, and the run ends in one line (guarded_run catches the OSError;
# checkpoint.save_checkpoint turns safetensors' own error into one: as_os_error).
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def write_failure(out_dir, err):
    """One line for an OSError from writing the run's files, or None when it is not one of those."""
    if not isinstance(err, OSError) or err.errno not in WRITE_ERRORS:
        return None
    where = f" ({err.filename})" if err.filename else ""
    kept = kept_words(out_dir, "free space, then --resume")
    return f"error: cannot write in {out_dir}: {err.strerror or err}{where}; {kept}"


def kept_words(out_dir, then):
    """What a run that ends on an error leaves to continue from, in words."""
    ckpt, state = C.latest_checkpoint(out_dir)
    return f"the last complete checkpoint, {ckpt} (step {state['step']}), is intact: {then}" if ckpt else \
        "no checkpoint was saved yet"
