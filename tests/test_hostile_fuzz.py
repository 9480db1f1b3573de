"""A small seeded fuzzer: malformed flag values for train.py, sample.py, evaluate.py, the tools/
and bench/ programs, and malformed files for their loaders, run in this process (main with the
model loading replaced by a marker, so everything before it runs for real). Every outcome is one
of: accepted (the marker is reached, or the loader returns), argparse's exit 2, or a SystemExit
whose message is one line starting with `error:`. Never another exception, never a traceback.
Values that no flag accepts (nan, inf, a number past 64 bits) must be refused, and so must one
flag given under two of its names. Paths include names with a byte that is not UTF-8, folders
holding a user's own files (never written into: their bytes are compared after every case) and
model folders whose weights are pickles (never unpickled: torch.load and pickle's loaders are
replaced by a marker that fails the case). checkpoint-* state.json values are fuzzed through a
real --resume. A failure names the seed and the argv."""
import contextlib
import io
import json
import os
import random

import pytest

import data
import evaluate as E
import model as M
import sample as S
import train
from plumbing import checkpoint as C
from plumbing import files, hub, report, toy_scorer

NEVER_VALID = {"nan", "inf", "-inf", "1e999", str(2 ** 64)}  # for number flags
FLOATS = ["nan", "inf", "-inf", "1e999", "-1", "0", "1e-320", "abc", "", "1,5", "0x10", "--", "-0.0", "3"]
INTS = ["-1", "0", str(2 ** 64), str(2 ** 31), "1.5", "abc", "", "1e3", "-0", "07", "3"]


class Loaded(Exception):
    """The fuzzed command got past its checks to the model loading."""


def texts(root):
    """Malformed text and path values; files and folders under ROOT (made by `world`)."""
    return [os.fsdecode(b"odd\xffname"), str(root / os.fsdecode(b"odd\xff")), str(root / "mine"),
            str(root / "pickled-unet"), str(root / "pickled-clip"), str(root / "pickled-pipeline"), "", " ", "-", "a" * 300, "../../etc", str(root / "dir"), str(root / "file.txt"), str(root / "missing.txt"),
            str(root / "missing" / "x"), str(root / "file.txt" / "below"), "prompts/", "hf:", "cache:", "toy#x",
            "pickapic:", "a|b", "|", "0-3,3", "3-1", "x/y", str(root / "garbage.json"), str(root / "garbage.jsonl"),
            str(root / "latin1.txt"), str(root / "link-out"), "café", "\t", "hf:a/b#prompt=", "1e999",
            str(root / "samples"), f"a={root / 'run'}", f"a={root / 'dir'}", "a=", "=", "toy", "toy-base", "builtin"]


def world(root):
    os.makedirs(root / "mine")  # a user's own folder: nothing may be written into it
    (root / "mine" / "README.md").write_text("my notes\n")
    os.makedirs(root / os.fsdecode(b"odd\xff"))
    pickled_model_folders(root)
    os.makedirs(root / "dir")
    (root / "file.txt").write_text("a cat\n")
    (root / "garbage.json").write_bytes(b"{\"a\": [1, 2")
    (root / "garbage.jsonl").write_bytes(b"not json\n{\"prompt\": 1}\n")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    os.symlink("/etc/hostname", root / "link-out")
    os.makedirs(root / "samples")  # a sample.py folder
    from PIL import Image
    Image.new("RGB", (16, 16)).save(root / "samples" / "0000_seed0.png")
    (root / "samples" / "samples.jsonl").write_text(json.dumps({"prompt": "a cat", "seed": 0, "file": "0000_seed0.png"}))
    os.makedirs(root / "run")  # a train.py folder, its log cut short
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')


def pickled_model_folders(root):
    """Folders laid out as the loaders expect, whose weights are pickles (a tiny state dict saved
    with torch.save): a diffusers unet/, a transformers CLIP, a pipeline with unet/ and vae/."""
    import torch
    state = {"w": torch.zeros(2)}
    for folder, name in (("pickled-unet", "diffusion_pytorch_model.bin"), ("pickled-clip", "pytorch_model.bin"),
                         ("pickled-pipeline/unet", "diffusion_pytorch_model.bin"),
                         ("pickled-pipeline/vae", "diffusion_pytorch_model.bin")):
        os.makedirs(root / folder)
        (root / folder / "config.json").write_text("{}")
        torch.save(state, root / folder / name)


def user_files(root):
    """{path: bytes} of the files a run must never change: the user's own folder and the inputs."""
    keep = [root / "mine" / "README.md", root / "file.txt", root / "garbage.json", root / "samples" / "samples.jsonl",
            root / "pickled-unet" / "diffusion_pytorch_model.bin"]
    return {str(p): p.read_bytes() for p in keep}


def flags_of(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def malformed_argv(rng, parser, root, skip=()):
    argv, never = [], False
    twice = [a for a in flags_of(parser) if a.dest not in skip and len(a.option_strings) > 1]
    if twice and rng.random() < 0.15:  # one flag under two of its names: refused, whatever the values
        action = rng.choice(twice)
        first, second = rng.sample(action.option_strings, 2)
        value = [] if action.nargs == 0 else ["1"]
        return [first, *value, second, *value], True
    for action in rng.sample([a for a in flags_of(parser) if a.dest not in skip], rng.randint(1, 3)):
        flag = rng.choice(action.option_strings)
        if action.nargs == 0:
            argv.append(flag)
            continue
        pool = FLOATS if action.type is float else INTS if action.type is int else texts(root)
        if action.choices and rng.random() < 0.5:
            pool = list(action.choices) + ["", "nope"]
        value = rng.choice(pool)
        never |= action.type in (float, int) and value in NEVER_VALID
        # (--flag=-1 form for values starting with "-"; but not "--flag=--": Python 3.11's argparse turns
        # that value into [] for any type, its own bug, fixed in 3.12)
        argv += [f"{flag}={value}"] if value.startswith("-") and value != "--" else [flag, value]
    return argv, never


def outcome(fn, argv):
    """'accepted', 'argparse' or 'error'; anything else fails the test with what happened."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            fn(argv)
        return "accepted"
    except Loaded:
        return "accepted"
    except SystemExit as exit_:
        assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
        if exit_.code == 2:
            assert err.getvalue().strip().splitlines()[-1].split(": error: ", 1)[1], argv  # argparse's one line
            return "argparse"
        assert isinstance(exit_.code, str) and exit_.code.startswith("error: ") and "\n" not in exit_.code, \
            (argv, exit_.code)
        return "error"


class Unpickled(Exception):
    """Something asked torch.load or pickle to read a file."""


UNPICKLED = []  # what was asked to be unpickled (a loader's broad except may swallow the marker itself)


def no_pickles(monkeypatch):
    import pickle
    import torch
    UNPICKLED.clear()

    def refuse(*a, **k):
        UNPICKLED.append(str(a[:1])[:200])
        raise Unpickled(f"unpickled: {a[:1]}")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Relative paths land in tmp_path; model loading, the toy scorer and reward models replaced by
    Loaded; the hub offline; nothing unpickled."""
    world(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (and as the libraries read it at their import:)
    import datasets
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def loaded(*a, **k):
        raise Loaded
    import diffusers
    import subprocess
    from tools import build_cache
    for module, name in ((M, "from_args"), (M, "load_models"), (S, "load_for_sampling"), (toy_scorer, "load_toy_scorer"),
                         (E, "load_reward_models"), (E.toy_scorer, "load_toy_scorer"), (build_cache, "write_cache"),
                         (diffusers.StableDiffusionInstructPix2PixPipeline, "from_pretrained"), (subprocess, "run")):
        monkeypatch.setattr(module, name, loaded)
    no_pickles(monkeypatch)
    return tmp_path


SKIP_TRAIN = ("device", "report_to", "num_workers", "resume", "recipe")
SKIP = {"train": SKIP_TRAIN,
        "sample": ("device", "lora"), "evaluate": ("device",), "tools.build_cache": ("device",),
        "tools.hpdv2_to_parquet": (), "tools.build_style": ("device",),
        "bench.speed": ("device", "grid", "out"), "bench.e2e": ("out",), "bench.profile": SKIP_TRAIN}  # (their --out appends rows to the file named)
# program: (its main, the flags every case starts from). (tools.to_safetensors reads pickles by
# design, with weights_only, and takes positional paths; tools.same_runs takes no flags: both
# have their own tests.)
PROGRAMS = {
    "train": (lambda: train.main, ["--max_steps", "1", "--no_progress", "--out_dir", "run"]),
    "sample": (lambda: S.main, ["--out", "new-samples"]),
    "evaluate": (lambda: E.main, ["--images", "samples"]),
    "tools.build_cache": (lambda: __import__("tools.build_cache").build_cache.main, ["--data", "toy", "--out", "cache"]),
    "tools.hpdv2_to_parquet": (lambda: __import__("tools.hpdv2_to_parquet").hpdv2_to_parquet.main,
                               ["--json", "garbage.json", "--images", "dir", "--out", "parquet"]),
    "tools.build_style": (lambda: __import__("tools.build_style").build_style.main,
                          ["--style", "toy-winter", "--src", "garbage.jsonl", "--out", "style"]),
    "bench.speed": (lambda: __import__("bench.speed").speed.main, ["--steps", "1", "--warmup", "0"]),
    "bench.e2e": (lambda: __import__("bench.e2e").e2e.main, ["--dry"]),
    "bench.profile": (lambda: __import__("bench.profile").profile.main,  # (train.py's flags, and two of its own)
                      ["--profile_warmup", "0", "--max_steps", "1", "--out_dir", "run"]),
}


def parser_of(main, base):
    """The parser a program builds inside its main: caught at its first parse (of nothing)."""
    import argparse
    seen = []
    real = argparse.ArgumentParser.parse_known_args

    def catch(self, *a, **k):
        seen.append(self)
        raise Loaded
    argparse.ArgumentParser.parse_known_args = catch
    try:
        main(list(base))
    except Loaded:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = real
    return seen[0]


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_malformed_flags_end_in_one_line(sandbox, program):
    """(Skipped flags: --device and --report_to load or import heavy things before their own checks;
    tests/test_hostile_flags.py has their cases.) After every case the user's files are as they were."""
    main, base = PROGRAMS[program][0](), PROGRAMS[program][1]
    parser = train.parser() if program in ("train", "bench.profile") else parser_of(main, base)
    before = user_files(sandbox)
    counts = {}
    for seed in range(200 if program in ("train", "sample", "evaluate") else 60):
        rng = random.Random(seed)
        argv, never = malformed_argv(rng, parser, sandbox, SKIP[program])
        result = outcome(main, base + argv)
        counts[result] = counts.get(result, 0) + 1
        assert not (never and result == "accepted"), f"seed {seed}: {program} accepted {argv}"
        assert user_files(sandbox) == before, f"seed {seed}: {program} {argv} changed a user's file"
        assert not UNPICKLED, f"seed {seed}: {program} {argv} unpickled {UNPICKLED}"
    assert counts.get("argparse", 0) + counts.get("error", 0) > 10, counts  # the fuzzer does reach the checks


def mutations(rng, good):
    """Malformed versions of the bytes GOOD: cut, a byte flipped, garbage, empty, another encoding."""
    cut = good[:rng.randrange(len(good) + 1)]
    flipped = bytearray(good)
    if flipped:
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return [cut, bytes(flipped), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), b"",
            good.decode("utf-8", "replace").encode("utf-16")]


def test_malformed_files_end_in_one_line(tmp_path):
    """Prompt files, a manifest, sample folders' samples.jsonl, metrics.jsonl, state.json and
    safetensors headers, mutated: each loader returns or ends in one line."""
    rng = random.Random(0)
    folder = tmp_path / "samples"
    os.makedirs(folder)
    from PIL import Image
    Image.new("RGB", (16, 16)).save(folder / "0000_seed0.png")
    from safetensors.torch import save_file
    import torch
    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "good.safetensors"))
    cases = {
        "prompts.txt": (b"a cat\na dog\n", lambda p: S.read_prompts(str(p))),
        "prompts.tsv": (b"Prompt\tCategory\na cat\tAnimals\n", lambda p: S.read_prompts(str(p))),
        "prompts.json": (b'{"anime": ["a girl"], "photo": ["a cat"]}', lambda p: S.read_prompts(str(p))),
        "pairs.jsonl": (b'{"prompt": "a", "winner": "w.png", "loser": "l.png"}\n',
                        lambda p: data.from_args(train.parse_args(["--data", str(p), "--batch_size", "1"]), 1)),
        "samples/samples.jsonl": (b'{"prompt": "a", "seed": 0, "file": "0000_seed0.png"}\n',
                                  lambda p: files.read_index(str(folder))),
        "run/metrics.jsonl": (b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n',
                              lambda p: report.read_metrics(str(p), log=lambda line: None)),
        "checkpoint-000001/state.json": (json.dumps({"step": 1, "epoch": 0, "items_in_epoch": 0, "args": {},
                                                     "optimizer": {"param_groups": []}}).encode(),
                                         lambda p: C.inspect_checkpoint(str(p.parent))),
        "w.safetensors": ((tmp_path / "good.safetensors").read_bytes(),
                          lambda p: hub.safetensors_problem(str(p)) or hub.non_float_tensor(str(p))),
        "style_points.json": (b'{"rpo": [[1, 0.5]]}', lambda p: E.read_style_points(str(p))),
    }
    for name, (good, load) in cases.items():
        path = tmp_path / name
        os.makedirs(path.parent, exist_ok=True)
        for k, bad in enumerate(mutations(rng, good) + [good]):
            path.write_bytes(bad)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    load(path)
            except SystemExit as exit_:
                assert isinstance(exit_.code, str) and exit_.code.startswith("error: ") and "\n" not in exit_.code, \
                    (name, k, bad[:80], exit_.code)


HOSTILE = [2 ** 70, 2 ** 31, -1, 1.5, "x", None, [], {}, True, float("nan"), float("inf"), {"a": -1}, ["x"]]


def test_state_json_values_out_of_range_end_in_one_line_or_resume(tmp_path):
    """A checkpoint's state.json with one value (or one of args', optimizer's, skip_counts') out of
    its range or of another type: --resume walks past it (one warning line) to the checkpoint
    before, or ends in one line; never a traceback after "resumed from"."""
    import shutil
    run = tmp_path / "run"
    train.main(["--max_steps", "2", "--save_every", "1", "--keep_checkpoints", "5", "--out_dir", str(run),
                "--no_progress", "--num_items", "4", "--batch_size", "4"])
    good = json.loads((run / "checkpoint-000002" / "state.json").read_text())
    places = [(k,) for k in good] + [("args", k) for k in ("model", "lora_rank", "resolution", "data", "loss")] + \
        [("optimizer", "param_groups"), ("optimizer", "scalars"), ("skip_counts", "x"), ("sha256", "rng.safetensors")]
    rng = random.Random(0)
    for case in range(16):
        where, value = rng.choice(places), rng.choice(HOSTILE)
        out = tmp_path / f"case{case}"
        shutil.copytree(run, out)
        state = json.loads(json.dumps(good))
        target = state
        for key in where[:-1]:
            target = target.setdefault(key, {}) if isinstance(target.get(key), dict) else target
        target[where[-1]] = value
        (out / "checkpoint-000002" / "state.json").write_text(json.dumps(state))
        result = outcome(train.main, ["--max_steps", "3", "--resume", "--out_dir", str(out), "--no_progress",
                                      "--num_items", "4", "--batch_size", "4"])
        assert result in ("accepted", "error"), (where, value, result)


def test_pickled_model_folders_are_never_unpickled(tmp_path, monkeypatch):
    """Every loader of model weights, given each folder whose weights are pickles: one line naming
    the converter, with torch.load and pickle's loaders replaced by a marker that fails the case."""
    pickled_model_folders(tmp_path)
    no_pickles(monkeypatch)
    loaders = {"hub.load_unet": lambda f: hub.load_unet(f, "--init"),
               "hub.load_clip": lambda f: hub.load_clip(f, "--clip_model", "CLIP", "cpu"),
               "hub.load_real": lambda f: hub.load_real(f, False),
               "model.load_models(init_unet)": lambda f: M.load_models("tiny", init_unet=f, reference=False),
               "model.load_models(pretrained)": lambda f: M.load_models("sd15", pretrained=f, reference=False),
               "model.load_embedder": lambda f: M.load_embedder(f)}
    for name, load in loaders.items():
        for folder in ("pickled-unet", "pickled-clip", "pickled-pipeline"):
            result = outcome(lambda argv: load(str(tmp_path / folder)), [])
            assert result == "error" and not UNPICKLED, (name, folder, result, UNPICKLED)
