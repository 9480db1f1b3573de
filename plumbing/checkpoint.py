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
"""
import glob
import json
import os
import re
import shutil

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


def inspect_checkpoint(folder):
    """-> (problem, state): problem is None for a complete checkpoint (state: its state.json),
    else one phrase saying what is wrong with it."""
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
    counts = [k for k in STATE_KEYS[:3] if not (type(state[k]) is int and state[k] >= 0)]
    if counts or not isinstance(state["args"], dict) or not isinstance(state["optimizer"], dict) \
            or not isinstance(state["optimizer"].get("param_groups"), list):
        return f"state.json has a malformed {(counts or ['args or optimizer'])[0]}", None
    files = ["optimizer.safetensors", "rng.safetensors"]
    if state["args"].get("lora_rank"):
        files.insert(0, os.path.join("lora", lora.LORA_FILE))
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
        files[:0] = shards or [os.path.join("unet", "diffusion_pytorch_model.safetensors")]
    for name in files:
        why = hub.safetensors_problem(os.path.join(folder, name))
        if why:
            return f"{name.replace(os.sep, '/')} {why}", None
    return None, state


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


def check_out_dir(args, master):
    """Before a run: a fresh one (no --resume) must not write into an OUT_DIR that holds another
    run's checkpoints or log (its keep-N clean-up, its metrics.jsonl, its final export would mix
    with or destroy them). With --overwrite, that run's checkpoint-* folders, metrics.jsonl,
    unet/, lora/, validation/, logs/, args.json and model card are deleted (nothing else). Rank 0 decides and deletes; every rank calls it."""
    problem = None
    if master:
        try:
            problem = _check_out_dir(args)
        except OSError as err:
            problem = f"error: cannot clear --out_dir {args.out_dir}: {err.strerror}: {err.filename}"
    if D.active() and not D.all_ranks(problem is None, _sync_device()):
        raise SystemExit(problem or 1)  # (other ranks: rank 0 prints the line)
    if problem:
        raise SystemExit(problem)


def _check_out_dir(args):
    out, overwrite = args.out_dir, getattr(args, "overwrite", False)
    problem = files.folder_problem(out, "--out_dir")
    if problem:
        return problem
    if args.resume:
        if overwrite:
            return "error: --overwrite starts over and --resume continues: pass one of them"
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
    print(f"--overwrite: deleted the run in {out} ({', '.join(found)})")
    return None


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
    """JSON written whole or not at all: PATH.part, fsync, rename."""
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)
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
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(path, m, optimizer, scaler, state, keep=None, unet=None):
    """Write everything into PATH.tmp (state.json last, after the rest is on disk), then swap it
    in: PATH -> PATH.old, PATH.tmp -> PATH, delete PATH.old. `unet` (default m.unet) and
    `optimizer` (an optimizer or its state dict) may be the full copies gathered from FSDP's
    shards. keep: how many step checkpoints to keep in PATH's folder (older ones go)."""
    path = os.path.normpath(path)
    tmp, old, parent = path + ".tmp", path + ".old", os.path.dirname(path) or "."
    _settle(path)
    shutil.rmtree(tmp, ignore_errors=True)
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
    # the marker: a folder with a state.json is complete
    _write_json(os.path.join(tmp, "state.json"),
                dict(state, optimizer=optimizer_meta, scaler=scaler.state_dict() if scaler.is_enabled() else None))
    if os.path.lexists(path):  # re-saving the same step: the old copy stays whole until the new one is in place
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)
    if keep:
        match = CHECKPOINT_NAME.match(os.path.basename(path))
        if match:
            prune_checkpoints(parent, int(match.group(1)), keep)


def save(path, args, m, optimizer, scaler, position, skip_counts, master, keep=None):
    """A checkpoint of the run at `position` (step, epoch, items_in_epoch). Every rank calls
    this (FSDP gathers its shards: collectives); rank 0 writes."""
    state = dict(position, world_size=dist.get_world_size() if D.active() else 1, skip_counts=skip_counts,
                 args=vars(args), cwd=os.getcwd(),
                 rng="timesteps/noise: Generator(seed, step, micro-batch), drawn for the "
                     "global micro-batch; crops: (seed, epoch, index)")
    unet, optim = parallel.fsdp_full_state(m.unet, optimizer, master) if args.fsdp else (m.unet, optimizer)
    if master:
        save_checkpoint(path, m, optim, scaler, state, keep, unet=unet)


# ---------------------------------------------------------------------------------------
# Resuming
def find_checkpoint(args, log=print):
    """--resume's checkpoint -> (path, state). `latest`: OUT_DIR's newest complete one, walking
    back past broken ones (one log line each); a folder: that checkpoint, which must be complete
    (a run's folder holding checkpoints: its newest complete one). Problems: one-line SystemExit."""
    where = args.out_dir
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
            if problem:
                raise SystemExit(f"error: --resume {args.resume}: {problem}")
            return folder, state
        where = folder  # a run's folder: its newest complete checkpoint
    folders = checkpoint_folders(where)
    if not folders:
        raise SystemExit(f"error: --resume found no checkpoint in '{where}'")
    ckpt, state = latest_checkpoint(where, log)
    if ckpt is None:
        raise SystemExit(f"error: --resume found no complete checkpoint in '{where}': all {len(folders)} are "
                         f"broken (the newest, {folders[0][1]}, {checkpoint_problem(folders[0][1])})")
    return ckpt, state


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
    """Load --resume's checkpoint (OUT_DIR's newest complete one, or the folder given) into the
    model, the optimizer and the scaler. Returns (checkpoint path, its state.json). Every rank
    reads it (on multi-node runs OUT_DIR must be a shared file system); with --fsdp rank 0 alone
    reads the full tensors into host memory and every rank receives its shard."""
    log = print if master else (lambda *a, **k: None)
    ckpt, state = find_checkpoint(args, log)
    check_resume_settings(args, ckpt, state, log)
    if args.resume != "latest":  # an earlier checkpoint: OUT_DIR's later ones are another run's future
        later = sorted({os.path.basename(p) for s, p in checkpoint_folders(args.out_dir) if s > state["step"]})
        if later:
            log(f"note: {args.out_dir} also holds later checkpoints ({', '.join(later)}); each stays until "
                f"this run saves that step")
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
    return ckpt, state


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
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return open(path, "a")


def export(out_dir, final, folder):
    """OUT_DIR/unet (or lora) from the final checkpoint, hard-linked to save disk (copied where
    links fail), swapped in by renames: a stock diffusers UNet folder / LoRA folder. A LoRA is also
    OUT_DIR/pytorch_lora_weights.safetensors, as diffusers' training scripts leave it."""
    target, tmp, old = (os.path.join(out_dir, folder + suffix) for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(os.path.join(final, folder)):
        src = os.path.join(final, folder, name)
        try:
            os.link(src, os.path.join(tmp, name))
        except OSError:
            shutil.copy2(src, os.path.join(tmp, name))
    _fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
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
