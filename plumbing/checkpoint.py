"""
Checkpoints of train.py, and its final weights: safetensors and JSON only, never pickle.

    OUT_DIR/checkpoint-000200/   unet/ (diffusers layout) or lora/ (diffusers LoRA format),
                                 optimizer.safetensors, rng.safetensors, state.json
    OUT_DIR/unet/ or lora/       the final weights, for sample.py and the stock pipelines

A checkpoint is complete when its state.json is there: it is written last, after every other
file is on disk (fsync). A save writes PATH.tmp, renames an existing PATH to PATH.old, PATH.tmp
to PATH, then deletes PATH.old, so a kill at any moment leaves a complete copy of the old or the
new checkpoint under one of those three names; --resume checks each candidate (state.json, every
safetensors header against its file's size, the rng file) and walks back past broken ones. A
checkpoint holds full, single-device state whatever wrote it (FSDP's shards are gathered first:
distributed.fsdp_full_state), so it resumes on any number of ranks, with or without --fsdp.

A checkpoint is checked against the model before it is used (its step against its name; its
tensors' names, shapes and dtypes; finite weights), and weights that are not finite are never
saved.

The rest of the run folder's rules are plumbing/run_dir.py's (the lock that lets one run write an
OUT_DIR at a time, the checks that a fresh run never writes into another run, Ctrl-C and a full
disk); its log, metrics.jsonl, is plumbing/report.py's. What this file needs from the model and
the objective (the preset's resolution, the settings the objective reads) train.py passes in.
"""
import errno
import glob
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from plumbing import distributed as D
from plumbing import files, hub, lora, parallel

# What must match for a run to continue a checkpoint: the weights have the same shape.
RESUME_KEYS = ("model", "lora_rank")
LORA_KEYS = ("lora_alpha", "lora_targets")
# What a continued run should not change silently (--allow_changed_resume lets it: the same model
# copied to another folder, say): the reference and starting weights (--pretrained, --init), the
# images it trains on and the objective, with every setting it reads (loss.settings_of: train.py
# passes them). Paths that exist are compared as places (relative and absolute are one folder).
CHANGED_KEYS = ("resolution", "pretrained", "init", "data", "loss")
PLACE_KEYS = ("pretrained", "init", "data")
# ...and the settings that make the data what it is, for the data that reads them (the toy set's preferred
# style and prompt split, toy-base's share of styled images, a parquet folder's split), and E5's CLIP.
DATA_KEYS = {"toy": ("style", "data_split"), "toy-base": ("style", "data_split", "style_fraction"),
             "hf:": ("data_split",), "pickapic:": ("data_split",)}
WHAT_DATA_READS = [k for keys in DATA_KEYS.values() for k in keys] + ["embed_model"]


def data_keys(data, reads):
    """The settings besides --data that make the data and the objective what they are (DATA_KEYS;
    --embed_model when the objective reads --embed, E5)."""
    found = next((keys for spec, keys in DATA_KEYS.items() if data == spec or (spec.endswith(":") and
                                                                                str(data).startswith(spec))), ())
    return found + (("embed_model",) if "embed" in reads else ())
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
def read_json(path):
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
    state, why = read_json(os.path.join(folder, "state.json"))
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
        config, why = read_json(os.path.join(folder, "unet", "config.json"))
        if why:
            return f"unet/config.json {why}", None
        shards = sorted(os.path.relpath(f, folder) for f in
                        glob.glob(os.path.join(folder, "unet", "diffusion_pytorch_model*.safetensors")))
        index, why = read_json(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json"))
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


# A checkpoint past the run's end (run_dir.check_out_dir asks before anything loads, resume after)
def past_the_end(ckpt, state, max_steps):
    """A --resume whose checkpoint is past --max_steps would train nothing and rewrite the run's
    args.json and export with the smaller number: one line instead."""
    if ckpt is None or state["step"] <= max_steps:
        return None
    return (f"error: --resume: checkpoint {ckpt} is at step {state['step']}, past --max_steps {max_steps}: nothing "
            f"to train; the run is left as it is (pass --max_steps above {state['step']} to continue it)")


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


def remove(path):
    """Delete a file or a folder; a symbolic link in its place goes, never what it points at."""
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
            remove(path)
            os.rename(best, path)
            _fsync(os.path.dirname(path) or ".", directory=True)
    remove(old)


def prune_checkpoints(parent, step, keep):
    """Keep the `keep` newest checkpoints up to STEP (the one just written counts): delete every
    checkpoint-N (and its .tmp/.old leftovers) with an older step. Checkpoints with a later step
    are never touched (a run resumed from an earlier one replaces them as it reaches them)."""
    older = sorted({s for s, _ in checkpoint_folders(parent) if s < step}, reverse=True)
    kept = set(older[:max(keep - 1, 0)])
    for s, path in checkpoint_folders(parent):
        if s < step and s not in kept:
            _remove_tree(path)


def as_os_error(err, path):
    """A SafetensorError from writing (its Rust io::Error: "... No space left on device (os error
    28)", or "Os { code: 28, ... }") as the OSError it wraps, so that run_dir.write_failure says it
    in one line; errno EIO when it names none."""
    code = re.search(r"(?:os error |code: )(\d+)", str(err))
    number = int(code.group(1)) if code else errno.EIO
    return OSError(number, os.strerror(number), path)


def save_checkpoint(path, m, optimizer, scaler, state, keep=None, unet=None):
    """Write everything into PATH.tmp (state.json last, after the rest is on disk), then swap it
    in: PATH -> PATH.old, PATH.tmp -> PATH, delete PATH.old. `unet` (default m.unet) and
    `optimizer` (an optimizer or its state dict) may be the full copies gathered from FSDP's
    shards. keep: how many step checkpoints to keep in PATH's folder (older ones go)."""
    path = os.path.normpath(path)
    tmp, old, parent = path + ".tmp", path + ".old", os.path.dirname(path) or "."
    _settle(path)
    remove(tmp)  # (a link there goes, not what it points at)
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
        remove(path)
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
    this (FSDP gathers its shards: collectives); rank 0 writes, and every rank returns once it has."""
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
    D.wait_for_everyone()  # (a rank that stops or fails next leaves only once the checkpoint is written)


def finite_weights(m):
    """Whether every trainable weight is finite, on every rank (FSDP: each checks its shards)."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
             for p in m.unet.parameters() if p.requires_grad)
    return D.all_ranks(ok, D.sync_device()) if D.active() else ok


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


def check_resume_settings(args, ckpt, state, reads, preset_resolution, log=print):
    """A checkpoint continues only the run that wrote it: the same model and adapter shape (always),
    and unless --allow_changed_resume the same reference, data, resolution and objective.
    reads: the settings the command's objective reads (loss.settings_of), the only ones of the
    objective compared (one it does not read may change); preset_resolution: the model preset's,
    what a --resolution left unset means (the model is the checkpoint's: checked first)."""
    saved = state["args"]
    for key in RESUME_KEYS + (LORA_KEYS if args.lora_rank else ()):
        if saved.get(key) != getattr(args, key, None):
            raise SystemExit(f"error: checkpoint {ckpt} was trained with --{key} {saved.get(key)}, "
                             f"not {getattr(args, key, None)}")
    family = lambda name: {"adamw_fused": "adamw"}.get(name, name)  # (the same state, another kernel)
    optimizer = getattr(args, "optimizer", "auto")  # ("auto": not resolved yet, as in a bare parse_args)
    if optimizer != "auto" and saved.get("optimizer", "auto") != "auto" and family(saved["optimizer"]) != family(optimizer):
        raise SystemExit(f"error: checkpoint {ckpt} was trained with --optimizer {saved['optimizer']}, not "
                         f"{args.optimizer}: its state is another optimizer's")
    now = vars(args)
    for key in CHANGED_KEYS + tuple(reads) + data_keys(getattr(args, "data", None), reads):
        if key not in saved:  # (a checkpoint from before the key existed)
            continue
        if key == "resolution":
            was, new = saved[key] or preset_resolution, now.get(key) or preset_resolution
        else:
            was, new = saved[key], now.get(key)
        if key in PLACE_KEYS:
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


def resume(args, m, optimizer, scaler, master, reads, preset_resolution):
    """Load --resume's checkpoint (OUT_DIR's newest complete one that fits this model and holds
    finite weights, or the folder given) into the model, the optimizer and the scaler. The
    command's optimizer settings (lr, betas, eps, weight decay, ...) replace the checkpoint's, and
    one line names each setting that differs from the checkpoint's run. Returns (checkpoint path,
    its state.json). Every rank reads it (on multi-node runs OUT_DIR must be a shared file system);
    with --fsdp rank 0 alone reads the full tensors into host memory and every rank receives its shard.
    reads, preset_resolution: check_resume_settings's (what the objective reads; the preset's resolution)."""
    log = print if master else (lambda *a, **k: None)
    command = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    rejected = {}

    def fits(ckpt, state):  # the settings first: another model or objective is refused, not walked past
        check_resume_settings(args, ckpt, state, reads, preset_resolution, log)
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
    world, was_world = dist.get_world_size() if D.active() else 1, state.get("world_size", 1)
    log(f"resumed from {ckpt} at step {state['step']}" + (f" (written by {was_world} process(es), continued by "
                                                          f"{world})" if world > 1 or was_world != world else ""))
    saved = state["args"]
    was_batch = saved.get("batch_size", args.batch_size)
    was, now = was_batch * was_world, args.batch_size * world  # (another global micro-batch draws other t, ε, crops)
    # the pairs one contrast spans, for an objective that takes ω (it reads τ): every rank's with
    # --global_contrast (or one process), else each rank's own
    spans = (0, 0) if "tau" not in reads else (was_batch * (was_world if saved.get("global_contrast") else 1),
                                               args.batch_size * (world if getattr(args, "global_contrast", 0) else 1))
    if was != now or spans[0] != spans[1]:
        log(f"note: the global micro-batch was {was} pairs (--batch_size × processes), now {now}" +
            (f"; one contrast spanned {spans[0]} pairs, now {spans[1]} (--global_contrast: every rank's)"
             if spans[0] != spans[1] else "") + ": the run goes on from the same data position, not as the "
            "uninterrupted run would")
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
    """A safetensors file's {name: (dtype, shape)}, read from its header by safe_open (no tensor
    is read), in the header's own order (offset_keys; keys() is sorted, and older safetensors have
    only keys()): the first misfit named is the file's first."""
    with safe_open(path, framework="pt") as f:
        names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in names}


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
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
    skip = set(QUIET_KEYS) | set(RESUME_KEYS) | set(LORA_KEYS) | set(CHANGED_KEYS) | set(WHAT_DATA_READS)
    return [f"--{k} {now[k]} (was {saved[k]})" for k in now
            if k in saved and k not in skip and not k.startswith("validation_") and now[k] != saved[k]]


# ---------------------------------------------------------------------------------------
# The final weights
def export(out_dir, final, folder):
    """OUT_DIR/unet (or lora) from the final checkpoint, hard-linked to save disk (copied where
    links fail), swapped in by renames: a stock diffusers UNet folder / LoRA folder. A LoRA is also
    OUT_DIR/pytorch_lora_weights.safetensors, as diffusers' training scripts leave it."""
    target, tmp, old = (os.path.join(out_dir, folder + suffix) for suffix in ("", ".tmp", ".old"))
    remove(tmp)  # (a link goes, not what it points at)
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
