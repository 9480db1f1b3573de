"""
Checkpoints and outputs of train.py: safetensors and JSON only, never pickle.

    OUT_DIR/checkpoint-000200/   unet/ (diffusers layout) or lora/ (diffusers LoRA format),
                                 optimizer.safetensors, rng.safetensors, state.json
    OUT_DIR/unet/ or lora/       the final weights, for sample.py and the stock pipelines
    OUT_DIR/metrics.jsonl        one line per optimizer step

A checkpoint is complete when its state.json is there: it is written last, after every other
file is on disk (fsync). A save writes PATH.tmp, renames an existing PATH to PATH.old, PATH.tmp
to PATH, then deletes PATH.old, so a kill at any moment leaves a complete copy of the old or the
new checkpoint under one of those three names; --resume checks each candidate (state.json, every
safetensors header against its file's size, the rng file) and walks back past broken ones. A
checkpoint holds full, single-device state whatever wrote it (FSDP's shards are gathered first:
distributed.fsdp_full_state), so it resumes on any number of ranks, with or without --fsdp.

One run writes an OUT_DIR at a time: it holds OUT_DIR/.lock (an flock, released by the kernel when
the process ends however it ends) for its whole life, and nothing it writes there follows a
symbolic link out of the folder. A checkpoint is checked against the model before it is used
(its step against its name; its tensors' names, shapes and dtypes; finite weights), and weights
that are not finite are never saved.
"""
import errno
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import loss as L
from plumbing import distributed as D
from plumbing import files, parallel
import model as M
from plumbing import hub, lora

# What must match for a run to continue a checkpoint: the reference is the same starting UNet,
# and the weights have the same shape.
RESUME_KEYS = ("model", "init", "lora_rank")
LORA_KEYS = ("lora_alpha", "lora_targets")
# What a continued run should not change silently (--allow_changed_resume lets it): the images it
# trains on and the objective, with every setting it reads (loss.SETTINGS).
CHANGED_KEYS = ("resolution", "data", "loss")
STATE_KEYS = ("step", "epoch", "items_in_epoch", "args", "optimizer")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)(\.tmp|\.old)?$")
LEFTOVER_ORDER = {None: 0, ".tmp": 1, ".old": 2}  # at one step: the checkpoint, a finished save, the one replaced


def optimizer_to_tensors(optimizer):
    """Tensors of the optimizer state for safetensors; plain numbers (Adafactor's step) for JSON.
    `optimizer`: an optimizer, or a state dict in its format (FSDP's, gathered)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    return tensors, dict(param_groups=sd["param_groups"], scalars=scalars)


def optimizer_state_from_tensors(tensors, meta):
    """The inverse of optimizer_to_tensors: a state dict in optimizer.state_dict()'s format."""
    state = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_unet_weights(folder, device):
    """A saved unet/ folder's weights as one state dict. save_pretrained splits a UNet above
    10 GB into several diffusion_pytorch_model-0000N-of-0000M.safetensors (SDXL in fp32 is 10.3)."""
    weights = {}
    for f in sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors"))):
        weights.update(load_file(f, device=str(device)))
    return weights


# ---------------------------------------------------------------------------------------
# Is a checkpoint whole? Headers and sizes only: cheap, whatever the model's size.
def _read_json(path):
    """(value, None) or (None, why not)."""
    if not os.path.isfile(path):
        return None, "is missing"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    except ValueError:
        return None, "is not valid JSON (cut short or overwritten)"


# A count in state.json is an int32, as train.py's flags are (--max_steps at most 2**31 - 1): a
# larger one (epoch 2**70) would overflow a random generator's seed after "resumed from".
MAX_COUNT = 2 ** 31 - 1


def _state_problem(state):
    """What is malformed in the parts of state.json a resume reads besides the STATE_KEYS (their
    types and ranges), as a phrase, or None."""
    counts = [k for k in STATE_KEYS[:3] if not (type(state[k]) is int and 0 <= state[k] <= MAX_COUNT)]
    if counts:
        return f"state.json has a malformed {counts[0]} ({str(state[counts[0]])[:40]}: not a count from 0 to {MAX_COUNT})"
    if not isinstance(state["args"], dict) or not isinstance(state["optimizer"], dict) \
            or not isinstance(state["optimizer"].get("param_groups"), list) \
            or not all(isinstance(g, dict) for g in state["optimizer"]["param_groups"]) \
            or not isinstance(state["optimizer"].get("scalars", {}), dict):
        return "state.json has a malformed args or optimizer"
    if not isinstance(state["args"].get("model", ""), str) or type(state["args"].get("lora_rank", 0)) is not int:
        return "state.json has a malformed args (model, lora_rank)"
    skips = state.get("skip_counts", {})
    if not (isinstance(skips, dict) and all(type(v) is int and 0 <= v <= 2 ** 63 - 1 for v in skips.values())):
        return "state.json has a malformed skip_counts (not counts)"
    world = state.get("world_size", 1)
    if not (type(world) is int and 1 <= world <= MAX_COUNT):
        return "state.json has a malformed world_size"
    if not isinstance(state.get("cwd", ""), (str, type(None))) or not isinstance(state.get("scaler"), (dict, type(None))):
        return "state.json has a malformed cwd or scaler"
    if not isinstance(state.get(DIGESTS, {}), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in state.get(DIGESTS, {}).items()):
        return f"state.json has a malformed {DIGESTS}"
    return None


def inspect_checkpoint(folder, verify=False):
    """-> (problem, state): problem is None for a complete checkpoint (state: its state.json),
    else one phrase saying what is wrong with it. verify: also read every file and compare its
    sha256 with the one recorded at save (a flipped byte inside a tensor; headers alone miss it)."""
    if not os.path.isdir(folder):
        return "does not exist" if not os.path.exists(folder) else "is not a folder", None
    if not os.path.exists(os.path.join(folder, "state.json")):
        return "has no state.json (its save did not finish)", None
    state, why = _read_json(os.path.join(folder, "state.json"))
    if why:
        return f"state.json {why}", None
    if not isinstance(state, dict):
        return "state.json holds no checkpoint state", None
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"state.json lacks {', '.join(missing)}", None
    malformed = _state_problem(state)
    if malformed:
        return malformed, None
    named = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder)))
    if named and int(named.group(1)) != state["step"]:  # moved, copied under another name, or edited
        return f"state.json says step {state['step']}, its name step {int(named.group(1))}", None
    needed = ["optimizer.safetensors", "rng.safetensors"]
    if state["args"].get("lora_rank"):
        needed.insert(0, os.path.join("lora", lora.LORA_FILE))
    else:
        config, why = _read_json(os.path.join(folder, "unet", "config.json"))
        if why:
            return f"unet/config.json {why}", None
        shards = sorted(os.path.relpath(f, folder) for f in
                        glob.glob(os.path.join(folder, "unet", "diffusion_pytorch_model*.safetensors")))
        index, why = _read_json(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json"))
        if index is not None:  # a sharded save: every shard it names
            try:
                shards = sorted({os.path.join("unet", f) for f in index["weight_map"].values()})
            except (KeyError, TypeError, AttributeError):
                return "unet/diffusion_pytorch_model.safetensors.index.json has no weight_map", None
        needed[:0] = shards or [os.path.join("unet", "diffusion_pytorch_model.safetensors")]
    for name in needed:
        why = hub.safetensors_problem(os.path.join(folder, name))
        if why:
            return f"{name.replace(os.sep, '/')} {why}", None
    return (digest_problem(folder, state) if verify else None), state


# ---------------------------------------------------------------------------------------
# Checkpoints verify their bytes: state.json records the sha256 of every other file of the
# checkpoint, taken at save before state.json is written; --resume (and python -m
# plumbing.checkpoint DIR) compares them. A checkpoint from before digests were kept has none:
# its headers and sizes are all that is checked.
DIGESTS = "sha256"


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_digests(folder):
    """{relative path with '/': sha256} of every file under FOLDER but state.json."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != "state.json":
                found[rel] = file_digest(os.path.join(root, name))
    return found


def digest_problem(folder, state):
    """None when every file state.json names has its recorded sha256, else the first that has not."""
    for rel, want in sorted(state.get(DIGESTS, {}).items()):
        path = os.path.join(folder, *rel.split("/"))
        if ".." in rel.split("/") or not os.path.isfile(path):
            return f"{rel} is missing (state.json records its digest)"
        try:
            got = file_digest(path)
        except OSError as err:
            return f"{rel} cannot be read ({err.strerror})"
        if got != want:
            return f"{rel} does not match its sha256 recorded at save (its bytes changed since)"
    return None


def checkpoint_problem(folder):
    """None for a complete checkpoint, else what is wrong with it."""
    return inspect_checkpoint(folder)[0]


def checkpoint_folders(out_dir):
    """[(step, path)] of OUT_DIR's checkpoint-N folders and the leftovers of interrupted saves
    (checkpoint-N.tmp, checkpoint-N.old), newest first; at one step the checkpoint itself first,
    then a finished .tmp, then the .old it was replacing."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    found = []
    for name in names:
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(out_dir, name)):
            found.append((int(match.group(1)), LEFTOVER_ORDER[match.group(2)], os.path.join(out_dir, name)))
    return [(step, path) for step, _, path in sorted(found, key=lambda f: (-f[0], f[1]))]


def latest_checkpoint(out_dir, log=None):
    """(path, state) of OUT_DIR's newest complete checkpoint, or (None, None). log(line): told
    about each newer one that is broken, and why."""
    for _, path in checkpoint_folders(out_dir):
        problem, state = inspect_checkpoint(path)
        if problem is None:
            return path, state
        if log:
            log(f"warning: skipping {path}: {problem}")
    return None, None


# ---------------------------------------------------------------------------------------
# A fresh run into a folder that holds one
def run_files(out_dir):
    """What OUT_DIR holds of a run: [names], the newest checkpoint first."""
    found = [os.path.basename(p) for _, p in checkpoint_folders(out_dir)]
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


def _sync_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _agree(problem, master):
    """Rank 0's verdict (a one-line error or None) made every rank's: all stop or none."""
    if D.active() and not D.all_ranks(problem is None, _sync_device()):
        raise SystemExit(problem or 1)  # (other ranks: rank 0 prints the line)
    if problem:
        raise SystemExit(problem)


def check_out_dir(args, master):
    """Before a run: a fresh one (no --resume) must not write into an OUT_DIR that holds another
    run's checkpoints or log (its keep-N clean-up, its metrics.jsonl, its final export would mix
    with or destroy them). With --overwrite, that run's checkpoint-* folders, metrics.jsonl,
    unet/, lora/, validation/, logs/, args.json and model card are deleted (nothing else). Nothing
    the run writes may be a symbolic link out of OUT_DIR, nor a file where it writes a folder (or
    the reverse). Rank 0 decides and deletes; every rank calls it."""
    again = False
    if args.resume == "latest" and not getattr(args, "overwrite", False) and not checkpoint_folders(args.out_dir):
        # as diffusers' scripts: nothing to resume yet, a new run starts. When the folder holds
        # this command's own run, killed before its first checkpoint, that run starts over (a
        # scheduler that reruns the command with --resume must not fail forever).
        again = bool(run_files(args.out_dir)) and own_partial_run(args)
        if master:
            print(f"--resume latest: no checkpoint in {args.out_dir} yet; " + (
                "its files are this command's own run, stopped before its first checkpoint: starting it again"
                if again else "starting a new run"))
        args.resume = None
    problem = None
    if master:
        try:
            problem = _check_out_dir(args, again)
        except OSError as err:
            problem = f"error: cannot clear --out_dir {args.out_dir}: {err.strerror}: {err.filename}"
    _agree(problem, master)


def _check_out_dir(args, again=False):
    out = args.out_dir
    return (files.folder_problem(out, "--out_dir") or _links_problem(out) or _foreign_problem(args)
            or _run_problem(args, again) or _kinds_problem(args))


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
    run writes and how it reports (QUIET_KEYS), and settings resolved later from "auto"."""
    saved, _ = _read_json(os.path.join(args.out_dir, "args.json"))
    if not isinstance(saved, dict):
        return False
    now = json.loads(json.dumps(vars(args), default=str))
    skip = set(QUIET_KEYS) | {k for k in RESOLVED_LATER if now.get(k) == "auto"} | ({"lr"} if now.get("scale_lr") else set()) \
        | ({"max_steps"} if now.get("max_steps") is None else set())  # (--num_train_epochs: resolved with the data)
    return all(now[k] == v for k, v in saved.items() if k in now and k not in skip)


# What a run writes at the top of OUT_DIR (and leftovers: NAME.tmp, NAME.part, NAME.old), and of which kind
RUN_ENTRIES = {"args.json": "file", "README.md": "file", "metrics.jsonl": "file", "unet": "folder", "lora": "folder",
               "logs": "folder", "wandb": "folder", "validation": "folder"}


def _runs_name(name):
    return bool(CHECKPOINT_NAME.match(name)) or name == LOCK_NAME or any(
        name == e or name.startswith(e + ".") for e in RUN_ENTRIES)


def past_the_end(ckpt, state, max_steps):
    """A --resume whose checkpoint is past --max_steps would train nothing and rewrite the run's
    args.json and export with the smaller number: one line instead."""
    if ckpt is None or state["step"] <= max_steps:
        return None
    return (f"error: --resume: checkpoint {ckpt} is at step {state['step']}, past --max_steps {max_steps}: nothing "
            f"to train; the run is left as it is (pass --max_steps above {state['step']} to continue it)")


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


def _kinds_problem(args):
    """A file where the run writes a folder (or the reverse): it would fail after the models load."""
    needed = dict(RUN_ENTRIES)
    for name, tracker in (("logs", "tensorboard"), ("wandb", "wandb")):
        if getattr(args, "report_to", None) != tracker:
            needed.pop(name)
    if not getattr(args, "validation_prompts", None):
        needed.pop("validation")
    for name, kind in needed.items():
        path = os.path.join(args.out_dir, name)
        if os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
            return (f"error: {path} is a {'folder' if kind == 'file' else 'file'}; the run writes its {name} "
                    f"{kind} there: move it away")
    return None


def _run_problem(args, again=False):
    out, overwrite = args.out_dir, getattr(args, "overwrite", False) or again
    if args.resume:
        if overwrite:
            return "error: --overwrite starts over and --resume continues: pass one of them"
        if args.resume == "latest" and getattr(args, "max_steps", None) is not None:
            ckpt, state = latest_checkpoint(out)  # (headers only: cheap, before anything loads)
            return past_the_end(ckpt, state, args.max_steps)
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
    # the log, the exported weights, then the checkpoints (a kill midway: the next --overwrite ends it)
    for path in sorted(doomed, key=lambda p: (not p.endswith("metrics.jsonl"), "checkpoint-" in p)):
        _remove(path)
    print(f"{'--resume' if again else '--overwrite'}: deleted the run in {out} ({', '.join(found)})")
    return None


# ---------------------------------------------------------------------------------------
# One run writes an OUT_DIR at a time
LOCK_NAME = ".lock"
_held = {}  # OUT_DIR's real path -> (descriptor of its .lock, the lock's path, whether the run made OUT_DIR)
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def lock_out_dir(out_dir, master=True):
    """Make OUT_DIR (if need be) and hold OUT_DIR/.lock until unlock_out_dir or the end of the
    process: a second run, or a --resume of a running one, stops at once with one line naming the
    holder. The lock is an flock, so a run killed by any means leaves no lock behind (its .lock
    file stays, naming it, and the next run takes it over). Where the file system has no flock,
    the holder's pid is checked instead (on the same host). Under torchrun rank 0 takes it."""
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
        info, _ = _read_json(path)
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _in_use(out_dir, _holder_words(path)[1])
        except (OSError, ImportError) as err:  # no flock here (some network file systems, Windows)
            if isinstance(err, OSError) and err.errno not in NO_FLOCK:
                os.close(fd)
                raise
            info, words = _holder_words(path) if os.path.getsize(path) else (None, "")
            if isinstance(info, dict) and info.get("pid") != os.getpid():
                if info.get("host") != socket.gethostname():
                    return _in_use(out_dir, words, f"; if that run is gone, delete {path}")
                if _alive(info.get("pid")):
                    return _in_use(out_dir, words)
        # The holder may have released (deleted) the file between our open and our flock: the
        # lock is ours only if the file at the path is the one we locked.
        try:
            here = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            same = (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    _held[key] = (fd, path, made)
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
    fd, path, made = held
    try:
        os.remove(path)
    except OSError:
        pass
    os.close(fd)
    if made:
        try:
            os.rmdir(out_dir)  # (only when empty)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop at the end of the step, with a checkpoint
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
        finally:
            unlock_out_dir(out_dir)


class Stop:
    """SIGINT and SIGTERM handlers for a run. Before the loop (models loading, data scanning) a
    signal stops at once; in the loop it is noted, and the loop stops after the step it is in,
    saves a checkpoint and exits (stop_now). The same signal again stops at once: a checkpoint
    being written at that moment is left for the next resume to walk back from. After the loop
    (`ending`: "saving" the final checkpoint, then its path while the export runs) a signal is
    noted too: the save and export finish, and `finish` says so and exits with its code."""
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signum, self.in_loop, self.previous, self.ending = None, False, {}, None

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
        # workers SIGTERM, and they should still finish the step and save)
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
        """At the very end: a signal noted during the final save and export stops the process now
        that they are done, with its line and exit code (the run is complete)."""
        if self.signum:
            self.stop_now(f"it came after the last step; the final save and export finished: {line}", master)

    def stop_now(self, line, master):
        """The one line (rank 0's) and the exit code of the signal: 130 for SIGINT, 143 for SIGTERM."""
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


# A disk that fills, a file system that turns read-only: the run's files stay as the last
# complete save left them, and the run ends in one line.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def write_failure(out_dir, err):
    """One line for an OSError from writing the run's files, or None when it is not one of those."""
    if not isinstance(err, OSError) or err.errno not in WRITE_ERRORS:
        return None
    ckpt, state = latest_checkpoint(out_dir)
    kept = (f"the last complete checkpoint, {ckpt} (step {state['step']}), is intact: free space, then --resume"
            if ckpt else "no checkpoint was saved yet")
    where = f" ({err.filename})" if err.filename else ""
    return f"error: cannot write in {out_dir}: {err.strerror or err}{where}; {kept}"


def as_os_error(err, path):
    """A SafetensorError from writing (its Rust io::Error: "... No space left on device (os error
    28)", or "Os { code: 28, ... }") as the OSError it wraps, so that write_failure says it in one
    line; errno EIO when it names none."""
    code = re.search(r"(?:os error |code: )(\d+)", str(err))
    number = int(code.group(1)) if code else errno.EIO
    return OSError(number, os.strerror(number), path)


# ---------------------------------------------------------------------------------------
# Saving
def _fsync(path, directory=False):
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # (a directory cannot be opened on some systems)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root):
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync(os.path.join(folder, name))
        _fsync(folder, directory=True)


def _write_json(path, value):
    """JSON written whole or not at all: PATH.part, fsync, rename (a link at PATH is replaced)."""
    files.write_atomic(path, json.dumps(value, indent=1))
    _fsync(os.path.dirname(path) or ".", directory=True)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _settle(path):
    """Before saving PATH: if a kill left the only complete copy of this step in PATH.tmp or
    PATH.old, make it PATH again (a broken PATH goes), so that writing the new PATH.tmp never
    destroys the last complete copy. Afterwards PATH.old is never the only complete copy: it goes."""
    tmp, old = path + ".tmp", path + ".old"
    if checkpoint_problem(path) is not None:
        best = next((c for c in (tmp, old) if os.path.isdir(c) and checkpoint_problem(c) is None), None)
        if best is not None:
            _remove(path)
            os.rename(best, path)
            _fsync(os.path.dirname(path) or ".", directory=True)
    _remove(old)


def prune_checkpoints(parent, step, keep):
    """Keep the `keep` newest checkpoints up to STEP (the one just written counts): delete every
    checkpoint-N (and its .tmp/.old leftovers) with an older step. Checkpoints with a later step
    are never touched (a run resumed from an earlier one replaces them as it reaches them)."""
    older = sorted({s for s, _ in checkpoint_folders(parent) if s < step}, reverse=True)
    kept = set(older[:max(keep - 1, 0)])
    for s, path in checkpoint_folders(parent):
        if s < step and s not in kept:
            _remove_tree(path)


def save_checkpoint(path, m, optimizer, scaler, state, keep=None, unet=None):
    """Write everything into PATH.tmp (state.json last, after the rest is on disk), then swap it
    in: PATH -> PATH.old, PATH.tmp -> PATH, delete PATH.old. `unet` (default m.unet) and
    `optimizer` (an optimizer or its state dict) may be the full copies gathered from FSDP's
    shards. keep: how many step checkpoints to keep in PATH's folder (older ones go)."""
    path = os.path.normpath(path)
    tmp, old, parent = path + ".tmp", path + ".old", os.path.dirname(path) or "."
    _settle(path)
    _remove(tmp)  # (a link there goes, not what it points at)
    try:
        _write_checkpoint(tmp, m, optimizer, scaler, state, unet)
    except BaseException as err:  # a full disk, a second Ctrl-C: the partial copy goes, the last complete checkpoint stays
        _remove_tree(tmp)
        if isinstance(err, SafetensorError):  # (safetensors' own class for an OSError from its writer)
            raise as_os_error(err, tmp) from err
        raise
    if os.path.lexists(path):  # re-saving the same step: the old copy stays whole until the new one is in place
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(parent, directory=True)
    _remove_tree(old)
    if keep:
        match = CHECKPOINT_NAME.match(os.path.basename(path))
        if match:
            prune_checkpoints(parent, int(match.group(1)), keep)


def _remove_tree(path):
    """Delete a folder, or a link in its place (never what the link points at); errors ignored."""
    try:
        _remove(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _write_checkpoint(tmp, m, optimizer, scaler, state, unet=None):
    """Everything of a checkpoint into the fresh folder TMP, state.json last."""
    if m.lora:
        lora.save_lora(m, os.path.join(tmp, "lora"))
    else:
        (unet or m.unet).save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    tensors, optimizer_meta = optimizer_to_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and dist.is_initialized():
        # this process's device only: get_rng_state_all() would open a CUDA context (~0.5 GB)
        # on every GPU of the node from rank 0. (Informational: training draws on CPU generators.)
        rng[f"torch_cuda{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
        rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    _fsync_tree(tmp)
    # the marker: a folder with a state.json is complete; it records every other file's sha256
    _write_json(os.path.join(tmp, "state.json"),
                dict(state, optimizer=optimizer_meta, scaler=scaler.state_dict() if scaler.is_enabled() else None,
                     **{DIGESTS: folder_digests(tmp)}))


def save(path, args, m, optimizer, scaler, position, skip_counts, master, keep=None):
    """A checkpoint of the run at `position` (step, epoch, items_in_epoch). Every rank calls
    this (FSDP gathers its shards: collectives); rank 0 writes."""
    state = dict(position, world_size=dist.get_world_size() if D.active() else 1, skip_counts=skip_counts,
                 args=vars(args), cwd=os.getcwd(),
                 rng="timesteps/noise: Generator(seed, step, micro-batch), drawn for the "
                     "global micro-batch; crops: (seed, epoch, index)")
    if not finite_weights(m):
        ckpt, good = latest_checkpoint(args.out_dir)
        kept = f"the last good checkpoint is {ckpt} (step {good['step']})" if ckpt else "no checkpoint was saved"
        raise SystemExit(f"error: the trained weights are not finite (nan or inf) at step {position['step']}; they "
                         f"are not saved, {kept}; try a lower --lr, and check the data and --init")
    unet, optim = parallel.fsdp_full_state(m.unet, optimizer, master) if args.fsdp else (m.unet, optimizer)
    if master:
        save_checkpoint(path, m, optim, scaler, state, keep, unet=unet)


def finite_weights(m):
    """Whether every trainable weight is finite, on every rank (FSDP: each checks its shards)."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
             for p in m.unet.parameters() if p.requires_grad)
    return D.all_ranks(ok, _sync_device()) if D.active() else ok


# ---------------------------------------------------------------------------------------
# Resuming
def find_checkpoint(args, log=print, fits=None):
    """--resume's checkpoint -> (path, state): the first of resume_candidates."""
    return next(resume_candidates(args, log, fits))


def resume_candidates(args, log=print, fits=None, rejected=None):
    """--resume's checkpoints, best first, as (path, state). `latest`: OUT_DIR's complete ones,
    newest first, walking back past broken ones (one log line each); a folder: that checkpoint,
    which must be complete (a run's folder holding checkpoints: its complete ones, newest first).
    fits(path, state): why that checkpoint does not fit the model (None: it fits), a check that
    treats a misfit as broken. rejected: {path: why} of candidates the caller found broken after
    taking them (it logs those itself). When none is left: one-line SystemExit."""
    where = args.out_dir
    rejected = {} if rejected is None else rejected
    if args.resume != "latest":
        folder = os.path.normpath(args.resume)
        named = CHECKPOINT_NAME.match(args.resume)  # diffusers' checkpoint-N: this run's checkpoint-00000N
        if named and not named.group(2) and not os.path.exists(folder):
            folder = os.path.join(args.out_dir, f"checkpoint-{int(named.group(1)):06d}")
        if not (os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "state.json"))
                and checkpoint_folders(folder)):
            problem, state = inspect_checkpoint(folder)
            if problem in ("does not exist", "is not a folder"):
                raise SystemExit(f"error: --resume found no checkpoint in '{args.resume}'")
            # (what does not fit is named first; then every file's bytes against their sha256)
            problem = problem or (fits and fits(folder, state)) or digest_problem(folder, state)
            if problem:
                raise SystemExit(f"error: --resume {args.resume}: {problem}")
            yield folder, state
            raise SystemExit(f"error: --resume {args.resume}: {rejected.get(folder, 'is broken')}")
        where = folder  # a run's folder: its newest complete checkpoint
    folders = checkpoint_folders(where)
    if not folders:
        raise SystemExit(f"error: --resume found no checkpoint in '{where}'")
    first = None
    for _, path in folders:
        problem, state = inspect_checkpoint(path)
        problem = problem or (fits and fits(path, state)) or digest_problem(path, state)
        if problem is None:
            yield path, state
            problem = rejected.get(path, "is broken")
        else:
            log(f"warning: skipping {path}: {problem}")
        first = first or problem
    raise SystemExit(f"error: --resume found no complete checkpoint in '{where}': all {len(folders)} are "
                     f"broken (the newest, {folders[0][1]}, {first})")


def _resolution(a):
    return a.get("resolution") or M.PRESETS.get(a.get("model"), {}).get("resolution")


def _data_place(spec, cwd):
    """--data as a place: a path that exists, made absolute (relative to CWD, the folder the run
    started in), or None (toy, a hub id, a path that is gone)."""
    if not isinstance(spec, str):
        return None
    scheme, rest = spec.split(":", 1) if spec.startswith(("cache:", "pickapic:")) else ("", spec)
    full = os.path.join(cwd or os.getcwd(), os.path.expanduser(rest))
    if not os.path.exists(full):
        return None
    return f"{scheme}:{os.path.realpath(full)}" if scheme else os.path.realpath(full)


def _changed_data(was, new, saved_cwd):
    """(was, new) as the refusal names them when --data changed, or None: two paths that exist
    are compared as places (the run may have started in another folder), anything else as text."""
    places = _data_place(was, saved_cwd), _data_place(new, None)
    if None not in places:
        return None if places[0] == places[1] else (places if was == new else (was, new))
    return None if was == new else (was, new)


def check_resume_settings(args, ckpt, state, log=print):
    """A checkpoint continues only the run that wrote it: the same model, reference and adapter
    shape (always), and unless --allow_changed_resume the same data, resolution and objective."""
    saved = state["args"]
    for key in RESUME_KEYS + (LORA_KEYS if args.lora_rank else ()):
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: checkpoint {ckpt} was trained with --{key} {saved.get(key)}, "
                             f"not {getattr(args, key)}")
    family = lambda name: {"adamw_fused": "adamw"}.get(name, name)  # (the same state, another kernel)
    optimizer = getattr(args, "optimizer", "auto")  # ("auto": not resolved yet, as in a bare parse_args)
    if optimizer != "auto" and saved.get("optimizer", "auto") != "auto" and family(saved["optimizer"]) != family(optimizer):
        raise SystemExit(f"error: checkpoint {ckpt} was trained with --optimizer {saved['optimizer']}, not "
                         f"{args.optimizer}: its state is another optimizer's")
    now = vars(args)
    read = L.settings_of(now.get("loss")) if now.get("loss") in L.OBJECTIVES else list(L.SETTINGS)
    relevant = {k: k in read for k in L.SETTINGS}  # (a setting the objective does not read may change)
    for key in CHANGED_KEYS + tuple(L.SETTINGS):
        if key not in saved or not relevant.get(key, True):  # (a checkpoint from before the key existed)
            continue
        if key == "resolution":
            was, new = _resolution(saved), _resolution(now)
        else:
            was, new = saved[key], now.get(key)
        if key == "data":
            changed = _changed_data(was, new, state.get("cwd"))
            if changed is None:
                continue
            was, new = changed
        elif was == new:
            continue
        if not getattr(args, "allow_changed_resume", False):
            raise SystemExit(f"error: checkpoint {ckpt} was trained with --{key} {was}, not {new} "
                             f"(pass --allow_changed_resume to continue anyway)")
        log(f"note: continuing checkpoint {ckpt} (trained with --{key} {was}) with --{key} {new}")


def resume(args, m, optimizer, scaler, master):
    """Load --resume's checkpoint (OUT_DIR's newest complete one that fits this model and holds
    finite weights, or the folder given) into the model, the optimizer and the scaler. The
    command's optimizer settings (lr, betas, eps, weight decay, ...) replace the checkpoint's, and
    one line names each setting that differs from the checkpoint's run. Returns (checkpoint path,
    its state.json). Every rank reads it (on multi-node runs OUT_DIR must be a shared file system);
    with --fsdp rank 0 alone reads the full tensors into host memory and every rank receives its shard."""
    log = print if master else (lambda *a, **k: None)
    command = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    rejected = {}

    def fits(ckpt, state):  # the settings first: another model or objective is refused, not walked past
        check_resume_settings(args, ckpt, state, log)
        return fit_problem(ckpt, state, m, optimizer)
    for ckpt, state in resume_candidates(args, log, fits, rejected):
        problem = past_the_end(ckpt, state, args.max_steps)
        if problem:
            raise SystemExit(problem)
        _load(args, ckpt, state, m, optimizer, scaler, master)
        if finite_weights(m):
            break
        rejected[ckpt] = "holds weights that are not finite (nan or inf)"
        log(f"warning: skipping {ckpt}: {rejected[ckpt]}")
    for group, settings in zip(optimizer.param_groups, command):  # the command wins: what it says trains
        group.update(settings)
    changed = changed_settings(state["args"], vars(args))
    if changed:
        log(f"note: the command's settings replace the checkpoint's: {', '.join(changed)}")
    if args.resume != "latest":  # an earlier checkpoint: OUT_DIR's later ones are another run's future
        later = sorted({os.path.basename(p) for s, p in checkpoint_folders(args.out_dir) if s > state["step"]})
        if later:
            log(f"note: {args.out_dir} also holds later checkpoints ({', '.join(later)}); each stays until "
                f"this run saves that step")
    world = dist.get_world_size() if D.active() else 1
    log(f"resumed from {ckpt} at step {state['step']}" + (f" (written by {state.get('world_size', 1)} process(es), "
                                                          f"continued by {world})" if world > 1 else ""))
    if state["step"] == args.max_steps:  # (a run stopped in its final export, say: the export is made again)
        log(f"note: {ckpt} is at --max_steps {args.max_steps} already: nothing left to train; its weights are "
            f"exported again")
    return ckpt, state


def _load(args, ckpt, state, m, optimizer, scaler, master):
    try:
        where = "cpu" if args.fsdp else str(m.device)
        reads = master or not args.fsdp
        optimizer_state = optimizer_state_from_tensors(
            load_file(os.path.join(ckpt, "optimizer.safetensors"), device=where), state["optimizer"]) if reads else {}
        if m.lora:  # the adapter only: the frozen base is rebuilt identically by load_models
            lora.load_lora(m, os.path.join(ckpt, "lora"))
        elif args.fsdp:
            weights = load_unet_weights(os.path.join(ckpt, "unet"), where) if master else {}
            parallel.fsdp_load_state(m.unet, optimizer, weights, optimizer_state)
        else:
            m.unet.load_state_dict(load_unet_weights(os.path.join(ckpt, "unet"), where))
        if not args.fsdp:
            optimizer.load_state_dict(optimizer_state)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(load_file(os.path.join(ckpt, "rng.safetensors"))["torch_cpu"])
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SystemExit(f"error: checkpoint {ckpt} does not load into this model ({first})")


# What a checkpoint's tensors must be, header by header (safetensors' dtype names)
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's and Adafactor's (when not factored): the parameter's shape


def _header(path):
    """A safetensors file's {name: (dtype, shape)} (its header only)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _tensor_misfit(name, have, want):
    """Why the tensors of file NAME ({key: (dtype, shape)}) do not match WANT's, or None."""
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which the model has not"
        return f"{name} {what} ({len(missing)} missing, {len(extra)} unknown tensors)"
    for key, (dtype, shape) in want.items():
        if have[key][1] != shape:
            return f"{name}: {key} has shape {have[key][1]}, the model's {shape}"
        if have[key][0] != dtype:
            return f"{name}: {key} is {have[key][0]}, the model's {dtype}"
    return None


def fit_problem(ckpt, state, m, optimizer):
    """Why checkpoint CKPT does not fit the model and optimizer (None: it fits): its weights'
    names, shapes and dtypes must be the model's, its optimizer state must be for as many
    parameters, each moment of its parameter's shape and dtype. Headers only."""
    spec = lambda t: (ST_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape))
    try:
        if m.lora:  # (load_lora compares names and shapes: the dtypes here)
            path = os.path.join(ckpt, "lora", lora.LORA_FILE)
            want = {spec(p)[0] for p in m.unet.parameters() if p.requires_grad}
            bad = next(((k, d) for k, (d, _) in _header(path).items() if d not in want), None)
            if bad:
                return f"lora/{lora.LORA_FILE}: {bad[0]} is {bad[1]}, the adapter's {' or '.join(sorted(want))}"
        else:
            have = {}
            for f in sorted(glob.glob(os.path.join(ckpt, "unet", "diffusion_pytorch_model*.safetensors"))):
                have.update(_header(f))
            problem = _tensor_misfit("unet/diffusion_pytorch_model.safetensors", have,
                                     {k: spec(v) for k, v in m.unet.state_dict().items()})
            if problem:
                return problem
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = sum(len(g.get("params", ())) for g in state["optimizer"]["param_groups"])
        if saved != len(params):
            return f"its optimizer state is for {saved} parameters, the model trains {len(params)}"
        header = _header(os.path.join(ckpt, "optimizer.safetensors"))
        for key, (dtype, shape) in header.items():
            pid, _, name = key.partition(".")
            if not (pid.isdigit() and int(pid) < len(params)):
                return f"optimizer.safetensors holds {key}, for no parameter of the model"
            if name in MOMENTS and (dtype, shape) != spec(params[int(pid)]):
                return f"optimizer.safetensors: {key} is {dtype} {shape}, its parameter {' '.join(map(str, spec(params[int(pid)])))}"
        return _missing_state(list(header) + list(state["optimizer"].get("scalars", {})), optimizer)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"cannot be read ({hub.first_line(err)})"
    return None


# What AdamW keeps for each parameter it has stepped (torch's; the fused kernel's is the same)
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def _missing_state(keys, optimizer):
    """Why the optimizer state named by KEYS ("PID.name", tensors and scalars) lacks a part that
    AdamW's step reads (a KeyError at the first step, after the model loaded), or None: every
    parameter that has state has all of ADAMW_STATE. (A parameter with no state at all is one no
    step has touched: its gradient was never there. Adafactor keeps other parts for factored and
    unfactored parameters: not checked here.)"""
    if not isinstance(optimizer, torch.optim.AdamW):
        return None
    names = {}
    for key in keys:
        pid, _, name = key.partition(".")
        names.setdefault(pid, set()).add(name)
    for pid in sorted(names, key=lambda p: int(p) if p.isdigit() else -1):
        lacking = [n for n in ADAMW_STATE if n not in names[pid]]
        if lacking:
            return f"its optimizer state lacks {pid}.{lacking[0]} (parameter {pid} has {', '.join(sorted(names[pid]))})"
    return None


# Settings that say where a run writes and how it reports, not what it trains
QUIET_KEYS = ("out_dir", "save_every", "keep_checkpoints", "resume", "overwrite", "allow_changed_resume",
              "no_progress", "log_every", "report_to", "num_workers")


def changed_settings(saved, now):
    """['--lr 0.001 (was 2e-05)', ...]: each training setting of the command that differs from
    the checkpoint's run (saved: its args); the ones check_resume_settings refuses or notes, and
    the output and validation settings, left out."""
    now = json.loads(json.dumps(now, default=str))  # (tuples as lists, as the checkpoint stored them)
    skip = set(QUIET_KEYS) | set(RESUME_KEYS) | set(LORA_KEYS) | set(CHANGED_KEYS)
    return [f"--{k} {now[k]} (was {saved[k]})" for k in now
            if k in saved and k not in skip and not k.startswith("validation_") and now[k] != saved[k]]


# ---------------------------------------------------------------------------------------
# The log and the final weights
def read_metrics(path, log=print):
    """The records of a metrics.jsonl; a last line cut short by a kill and unreadable lines are
    dropped, with a warning line each kind."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    cut = lines.pop() if lines else b""  # after the last newline: b"" unless the last write was cut short
    records, bad = [], []
    for number, line in enumerate(lines + ([cut] if cut.strip() else []), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not (isinstance(record, dict) and type(record.get("step")) is int):
                raise ValueError
        except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            if number > len(lines):
                log(f"warning: {path}: its last line is cut short (a run killed mid-write); dropped")
            else:
                bad.append(number)
            continue
        records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        log(f"warning: {path}: dropped {len(bad)} unreadable line(s) (line {shown})")
    return records


def open_metrics(out_dir, step, resumed):
    """OUT_DIR/metrics.jsonl for appending, one line per step, never two: a resumed run replays
    the steps after its checkpoint, so their old lines go (and any a kill cut short or that is
    not a record); a fresh run starts a fresh log. The kept lines are swapped in by a rename."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder; the run's log goes there")
    kept = []
    if resumed and os.path.exists(path):
        kept = [r for r in read_metrics(path) if r["step"] <= step]
    files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")


def export(out_dir, final, folder):
    """OUT_DIR/unet (or lora) from the final checkpoint, hard-linked to save disk (copied where
    links fail), swapped in by renames: a stock diffusers UNet folder / LoRA folder. A LoRA is also
    OUT_DIR/pytorch_lora_weights.safetensors, as diffusers' training scripts leave it."""
    target, tmp, old = (os.path.join(out_dir, folder + suffix) for suffix in ("", ".tmp", ".old"))
    _remove(tmp)  # (a link goes, not what it points at)
    os.makedirs(tmp)
    for name in os.listdir(os.path.join(final, folder)):
        src = os.path.join(final, folder, name)
        try:
            os.link(src, os.path.join(tmp, name))
        except OSError:
            shutil.copy2(src, os.path.join(tmp, name))
    _fsync_tree(tmp)
    _remove_tree(old)
    if os.path.lexists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    _remove_tree(old)
    if folder == "lora":  # where diffusers' scripts leave it: pipe.load_lora_weights(OUT_DIR) finds it
        root, part = os.path.join(out_dir, lora.LORA_FILE), os.path.join(out_dir, lora.LORA_FILE + ".tmp")
        if os.path.lexists(part):
            os.remove(part)
        try:
            os.link(os.path.join(target, lora.LORA_FILE), part)
        except OSError:
            shutil.copy2(os.path.join(target, lora.LORA_FILE), part)
        os.replace(part, root)
    return target


# ---------------------------------------------------------------------------------------
# python -m plumbing.checkpoint DIR: verify a run's checkpoints (or one) without loading anything
def verify(folder, log=print):
    """Every checkpoint of FOLDER (a run's folder, or one checkpoint folder) checked as --resume
    checks it: state.json, every safetensors header against its file's size, and the sha256 of
    every file recorded at save. One line each; returns how many are broken."""
    if os.path.isfile(os.path.join(folder, "state.json")):
        found = [folder]
    else:
        found = [path for _, path in checkpoint_folders(folder)]
    if not found:
        raise SystemExit(f"error: {folder}: no checkpoint there (neither a checkpoint folder nor a run's folder "
                         f"holding checkpoint-N folders)")
    bad = 0
    for path in found:
        problem, state = inspect_checkpoint(path, verify=True)
        if problem:
            bad += 1
            log(f"{path}: broken: {problem}")
        else:
            log(f"{path}: whole (step {state['step']}" + (f", {len(state[DIGESTS])} files match their sha256)"
                                                          if state.get(DIGESTS) else
                                                          "; saved before digests were kept: headers and sizes only)"))
    return bad


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m plumbing.checkpoint",
                                description="Verify train.py checkpoints: headers, sizes, and every file's sha256 "
                                            "against the one recorded at save. Exit code 1 when one is broken.")
    p.add_argument("folder", help="a run's --out_dir (all its checkpoints) or one checkpoint-N folder")
    args = p.parse_args(argv)
    bad = verify(args.folder)
    if bad:
        raise SystemExit(f"error: {bad} broken checkpoint(s) in {args.folder}")


if __name__ == "__main__":
    main()
