"""Prose claims that a run can check, checked by a run, so that a move of code cannot leave them
stale:
- the order the pages say a training step computes the equations (README, docs/read-along.md,
  docs/method.md, train.py) is read-along.md's section order, and the order in which each
  objective's train.micro_batch_loss calls loss.py's equations;
- loss.py's list of its functions is in the order the file defines them, with the labels used above;
- the files and the number of functions one pair passes through from batch to loss, and the files
  a whole training step runs, as the README's "Read the code with the paper" states them (traced
  with sys.setprofile, as one would by hand: every call into a project .py file);
- the figures the README quotes for `python train.py` (steps, pairs, the first run training
  toy-clip, and, loosely, its time)."""
import ast
import json
import os
import re
import sys

import pytest
import torch

import data
import loss as L
import model as M
import train
from plumbing import toy_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
ORDER_RE = re.compile(r"E\d(?:/E\d)?(?:, E\d(?:/E\d)?){4,}")  # a stated order: five or more labels


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def page_order():
    """read-along.md's sections, in order, as labels: ["E8", "E1", "E2/E3", ...]."""
    heads = re.findall(r"^## (E\d(?:, E\d)*):", read("docs/read-along.md"), flags=re.M)
    return [h.replace(", ", "/") for h in heads]


def loss_py_list():
    """loss.py's docstring list, function -> label ("E2, E3" -> "E2/E3"), in its order."""
    doc = ast.get_docstring(ast.parse(read("loss.py")))
    rows = re.findall(r"^  (\w+)\s+(E\d(?:, E\d)*)\s", doc, flags=re.M)
    return {name: label.replace(", ", "/") for name, label in rows}


def trace(fn):
    """Run fn() and return [(file, qualified function name)] of every call into a project .py
    file (tests excluded), in call order."""
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(ROOT + os.sep) and os.sep + "tests" + os.sep not in path:
                calls.append((os.path.relpath(path, ROOT), getattr(frame.f_code, "co_qualname", frame.f_code.co_name)))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.fixture(scope="module")
def setup():
    m = M.load_models("tiny")
    ds = data.build_dataset("toy", 16, num_items=16)
    batch = data.collate_pairs([ds[i] for i in range(4)])
    return m, batch


def step_calls(setup, loss):
    m, batch = setup
    args = train.parse_args(["--loss", loss, "--batch_size", "4", "--embed_model", "tiny"])
    embedder = M.load_embedder("tiny") if L.OBJECTIVES[loss]["weights"] else None
    return trace(lambda: train.micro_batch_loss(m, batch, torch.Generator().manual_seed(0), args, embedder=embedder))


def test_the_pages_state_the_order_a_step_runs():
    order = page_order()
    assert order == ["E8", "E1", "E2/E3", "E5", "E6", "E4/E7", "E9"], order  # (a new section: update the pages)
    stated = ", ".join(order)
    for path in ("README.md", "docs/read-along.md", "docs/method.md", "train.py", "loss.py"):
        found = ORDER_RE.findall(read(path))
        assert all(f == stated for f in found), f"{path} states {found}, the page runs {stated}"
        if path != "loss.py":
            assert stated in found, f"{path} does not state the order {stated}"


def test_loss_py_lists_its_functions_in_file_order():
    listed = list(loss_py_list())
    defined = [n.name for n in ast.parse(read("loss.py")).body if isinstance(n, ast.FunctionDef)]
    assert listed == [n for n in defined if n in listed]
    assert set(listed) >= {"denoising_error", "sample_timesteps", "dpo_loss", "rpo_weights", "rpo_loss", "sft_loss"}


@pytest.mark.parametrize("loss", list(L.OBJECTIVES))
def test_each_objective_computes_the_equations_in_the_page_order(setup, loss):
    labels = loss_py_list()
    seen = []
    for path, name in step_calls(setup, loss):
        label = labels.get(name) if path == "loss.py" else None
        if label and (not seen or seen[-1] != label):
            seen.append(label)
    order = page_order()
    assert seen and seen[-1] == {"rpo": "E4/E7", "dpo": "E2/E3", "sft": "E9"}[loss], seen
    positions = [order.index(x) for x in seen]
    assert positions == sorted(positions), f"{loss} computes {seen}; the pages say {order}"


def readme_route():
    text = " ".join(read("README.md").split())
    m = re.search(r"One pair goes from batch to loss through (\w+) files and (\d+) functions(.*?); a whole training "
                  r"step also runs (.*?)\(", text)
    assert m, "the README's sentence on the files one pair passes through moved: update tests/test_prose.py"
    files = re.findall(r"`([\w/]+\.py)`", m.group(3).split("):", 1)[-1])  # (after "(RPO, ...; traced by ...):")
    return WORDS.get(m.group(1), m.group(1)), int(m.group(2)), files, re.findall(r"`([\w/]+\.py)`", m.group(4))


def test_one_pair_passes_through_the_files_and_functions_the_readme_names(setup):
    n_files, n_functions, files, more = readme_route()
    calls = step_calls(setup, "rpo")
    traced = sorted({f for f, _ in calls})
    named = {c for c in calls if "<" not in c[1]}  # functions by name; comprehensions and lambdas are not
    assert n_files == len(files) and sorted(files) == traced, (files, traced)
    assert n_functions == len(named), sorted(named)


def test_a_whole_step_runs_the_files_the_readme_names(tmp_path, monkeypatch):
    """As python train.py runs it (tiny, RPO): every project file called between the 3rd and the 4th
    backward, one whole steady step (loss, backward, optimizer, log line, next batch)."""
    _, _, files, more = readme_route()
    count, hits = {"n": 0}, set()
    backward = torch.Tensor.backward

    def counting(self, *a, **k):
        count["n"] += 1
        return backward(self, *a, **k)

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and count["n"] == 3 and path.startswith(ROOT + os.sep) and os.sep + "tests" + os.sep not in path:
            hits.add(os.path.relpath(path, ROOT))

    monkeypatch.setattr(torch.Tensor, "backward", counting)
    sys.setprofile(profile)
    try:
        train.main(["--batch_size", "4", "--max_steps", "5", "--no_progress", "--out_dir", str(tmp_path / "run")])
    finally:
        sys.setprofile(None)
    assert sorted(hits) == sorted(files + more), sorted(hits)


def quick_start():
    text = read("README.md")
    block = text[text.index("## Quick start"):text.index("## The main job")]
    return " ".join(block.split())


def test_the_readme_figures_for_python_train_py(monkeypatch):
    """What the Quick start says `python train.py` does: RPO on tiny, its steps and pairs, and a
    first run that trains toy-clip (its steps as quoted)."""
    text = quick_start()
    m = re.search(r"RPO on the tiny built-in model, (\d+) steps of (\d+) pairs", text)
    assert m, text
    monkeypatch.delenv("RPO_DIFFUSION_TOY_E5", raising=False)  # (the suite's; a user has none)
    args = train.parse_args([])
    assert (args.loss, args.model, args.max_steps, args.batch_size * args.grad_accum) == (
        "rpo", "tiny", int(m.group(1)), int(m.group(2)))
    assert args.embed_model == "toy-clip" and "shipped toy-clip" in text
    assert toy_clip.source() == toy_clip.SHIPPED  # (the shipped one is today's recipe's)


def test_the_readme_time_for_python_train_py_is_the_measured_one():
    """The time the README quotes for `python train.py` is the one measured and recorded, with its
    command and machine, in results/train_py_time.md (a timed test would fail on a slower or busier
    machine; a figure moved in one place and not the other fails here)."""
    quoted = re.search(r"python train.py +# (\d+ min \d+ s) to (\d+ min \d+ s)", read("README.md"))
    assert quoted, "the README's python train.py line quotes no time"
    measured = re.findall(r"\| (\d+ min \d+ s) \|", read("results/train_py_time.md"))
    cached = measured[1:]  # (the first run's row trained toy-clip, which now ships)
    assert quoted.groups() == (min(cached, key=seconds), max(cached, key=seconds)), (quoted.groups(), measured)


def seconds(text):
    m, s = re.match(r"(\d+) min (\d+) s", text).groups()
    return int(m) * 60 + int(s)


def test_e5_as_written_holds_for_the_features_train_py_passes():
    """README and method.md write E5 as normalize(normalize(text) + normalize(image)); the inner
    normalize is model.clip_features', the outer loss.combine_features'. On real toy batches through
    toy-clip's shapes (the random tiny CLIP: raw features far from unit norm) the halves come out
    unit-norm and the combination equals the equation as written, to rounding. (Normalising again
    inside combine_features would change the last bits of f and of ω in most batches, so it is not
    done: training runs stay as they are.)"""
    clip, tok = M.load_embedder("tiny")
    ds = data.build_dataset("toy", 16, num_items=32)
    for start in range(0, 32, 8):
        batch = data.collate_pairs([ds[i] for i in range(start, start + 8)])
        images = torch.cat([batch["winner"], batch["loser"]])
        text, image = M.clip_features(clip, tok, batch["prompt"], images)
        assert torch.allclose(text.norm(dim=1), torch.ones(8)) and torch.allclose(image.norm(dim=1), torch.ones(16))
        n = torch.nn.functional.normalize
        for mode, parts in (("mean", n(text).repeat(2, 1) + n(image)), ("text", n(text).repeat(2, 1)), ("image", n(image))):
            assert torch.allclose(L.combine_features(text, image, mode, rows=16), n(parts), atol=1e-6)
