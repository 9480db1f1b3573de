"""docs/fork.md's example objective, run as written: its code added to loss.py's namespace, the
flags derived from the list, k = 1 with text embeddings equal to DPO, a short run and its resume."""
import json
import math
import os
import re

import pytest
import torch

import loss as L
import model as M
import train
from plumbing import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def topk(monkeypatch):
    """loss.py with the page's two code blocks added (and removed again after the test)."""
    text = open(os.path.join(ROOT, "docs", "fork.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.setattr(L, "OBJECTIVES", dict(L.OBJECTIVES))
    monkeypatch.setattr(L, "SETTINGS", dict(L.SETTINGS))
    for block in blocks:
        exec(block, vars(L))
    yield L.OBJECTIVES["rpo_topk"]
    vars(L).pop("rpo_topk_loss", None)


def test_the_new_objective_gets_its_flags_from_the_list(topk):
    args = train.parse_args(["--loss", "rpo_topk", "--topk", "3"])
    assert args.topk == 3 and args.timesteps == "batch" and L.settings_of("rpo_topk")[-1] == "topk"
    assert set(L.loss_kwargs("rpo_topk", vars(args))) == {"beta", "topk"}
    with pytest.raises(SystemExit):
        train.parse_args(["--loss", "rpo_topk", "--topk", "0"])  # declared positive: checked for rpo_topk
    assert train.parse_args(["--loss", "rpo", "--topk", "0"]).topk == 0  # not for an objective that does not read it
    assert "rpo_topk: RPO against each winner's topk most similar losers (reads beta, tau, embed, timesteps, " \
           "topk)" in " ".join(train.parser().format_help().split())  # --help: what each objective reads


def test_top1_with_text_embeddings_is_dpo(topk):
    ds = __import__("data").build_dataset("toy", 16, num_items=16)
    batch = __import__("data").collate_pairs([ds[i] for i in range(4)])
    m = M.load_models("tiny")
    with torch.no_grad():
        for p in m.unet.parameters():  # a policy away from the reference: the loss is not ln 2
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    losses = {}
    for name, extra in (("rpo_topk", ["--topk", "1"]), ("dpo", [])):
        args = train.parse_args(["--loss", name, "--embed", "text", "--timesteps", "batch", *extra])
        loss, _ = train.micro_batch_loss(m, batch, torch.Generator().manual_seed(0), args, D.Share(4),
                                         embedder=M.load_embedder("tiny"))
        losses[name] = loss.item()
    assert abs(losses["dpo"] - L.LN2) > 1e-3
    assert losses["rpo_topk"] == pytest.approx(losses["dpo"], rel=1e-6)


def test_a_run_of_the_new_objective_trains_logs_and_resumes(topk, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--loss", "rpo_topk", "--topk", "2", "--batch_size", "4", "--num_items", "16", "--no_progress",
            "--log_every", "1", "--out_dir", str(out)]
    train.main(base + ["--max_steps", "2", "--save_every", "1"])
    printed = capsys.readouterr().out
    assert "weight_diag" in printed  # its diagnostics on the log line
    # the start line and the model card name the settings it reads, and only those (not rpo_weighting)
    assert "training rpo_topk (beta 5000, tau 0.5, embed mean, timesteps batch, topk 2) on tiny (" in printed
    assert json.load(open(out / "args.json"))["topk"] == 2
    card = open(out / "README.md").read()
    assert "topk = 2" in card and "rpo_weighting" not in card
    with pytest.raises(SystemExit, match="topk"):  # a setting it reads may not change mid-run
        train.main(base[:3] + ["3"] + base[4:] + ["--max_steps", "3", "--resume"])
    train.main(base + ["--max_steps", "3", "--resume", "--rpo_weighting", "inside"])  # one it does not read may
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_flags_doc_names_only_objectives_and_settings_that_exist():
    """docs/flags.md's objective rows name objectives and settings by name alone, and the objectives
    said to read each setting: every name must exist in loss.py (and read it), none has to be there,
    so a fork's objective adds no row and its merge touches no doc (--help lists it)."""
    text = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    block = text.split("<!-- objective rows:")[1].split("\n| optimisation |")[0]
    head, *rows = block.splitlines()[1:]
    objectives = re.findall(r"`(\w+)`:", head)
    assert head.startswith("| objective | `--loss` |") and objectives and set(objectives) <= set(L.OBJECTIVES)
    for row in rows:
        name = re.match(r"\| \| `--(\w+)` \|", row).group(1)
        assert name in L.SETTINGS, row
        readers = re.findall(r"`(\w+)`", row.split("read by", 1)[1])
        assert all(name in L.settings_of(o) for o in readers), row


def test_flags_doc_check_passes_with_a_forks_objective_added(topk):
    test_flags_doc_names_only_objectives_and_settings_that_exist()


@pytest.fixture
def margin(monkeypatch):
    """An objective with a float setting whose default is 0 (in a declared range) and a bool switch."""
    monkeypatch.setattr(L, "OBJECTIVES", dict(L.OBJECTIVES))
    monkeypatch.setattr(L, "SETTINGS", dict(L.SETTINGS))

    def dpo_margin_loss(err_w, err_l, ref_err_w, ref_err_l, beta=5000.0, margin=0.0, flip=False):
        sign = -1 if flip else 1
        return L.dpo_loss(sign * err_w - margin, sign * err_l, sign * ref_err_w, sign * ref_err_l, beta)

    L.OBJECTIVES["dpo_margin"] = dict(L.OBJECTIVES["dpo"], fn=dpo_margin_loss, about="DPO with a margin")
    L.SETTINGS["margin"] = dict(type=float, default=0.0, losses=("dpo_margin",), range=(0.0, 1.0), help="margin")
    L.SETTINGS["flip"] = dict(type=bool, default=False, losses=("dpo_margin",), help="swap winner and loser")


def refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(flags)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_float_setting_defaulting_to_0_works_and_is_checked_for_its_objective_only(margin, capsys):
    args = train.parse_args(["--loss", "dpo_margin"])
    assert args.margin == 0.0 and L.loss_kwargs("dpo_margin", vars(args)) == {"beta": 5000.0, "margin": 0.0,
                                                                            "flip": False}
    assert train.parse_args(["--loss", "dpo_margin", "--margin", "0.5"]).margin == 0.5
    assert refused(["--loss", "dpo_margin", "--margin", "2"], capsys).endswith(
        "error: --margin must be between 0.0 and 1.0, not 2.0")
    # not read by dpo: neither checked nor passed; a positive setting dpo does not read may be 0
    args = train.parse_args(["--loss", "dpo", "--margin", "2", "--tau", "0"])
    assert "margin" not in L.loss_kwargs("dpo", vars(args)) and "margin" not in L.settings_of("dpo")
    assert refused(["--loss", "dpo", "--tau", "0", "--beta", "0"], capsys).endswith(
        "error: --beta must be a positive finite number, not 0.0")
    # a number must be finite whichever objective reads it
    assert refused(["--loss", "dpo", "--margin", "nan"], capsys).endswith("error: --margin must be a finite number, not nan")


def test_a_bool_setting_is_a_switch(margin, capsys):
    assert train.parse_args(["--loss", "dpo_margin"]).flip is False
    assert train.parse_args(["--loss", "dpo_margin", "--flip"]).flip is True
    assert train.parse_args(["--loss", "dpo_margin", "--no-flip"]).flip is False
    assert "unrecognized arguments: False" in refused(["--loss", "dpo_margin", "--flip", "False"], capsys)
    help_text = train.parser().format_help()
    assert "--flip, --no-flip" in help_text


def test_an_objective_may_name_its_draw_of_t(monkeypatch):
    seen = []

    def late_t(num_pairs, T, mode, generator):
        seen.append((num_pairs, T, mode))
        return torch.full((num_pairs,), T - 1)

    monkeypatch.setitem(L.OBJECTIVES, "dpo_late", dict(L.OBJECTIVES["dpo"], sample_t=late_t))
    ds = __import__("data").build_dataset("toy", 16, num_items=16)
    batch = __import__("data").collate_pairs([ds[i] for i in range(4)])
    args = train.parse_args(["--loss", "dpo_late"])
    loss, _ = train.micro_batch_loss(M.load_models("tiny"), batch, torch.Generator().manual_seed(0), args)
    assert seen == [(4, 1000, "pair")] and loss.item() == pytest.approx(L.LN2)


def test_e5_is_the_one_function_train_embed(monkeypatch):
    """An idea that replaces f(c, x) replaces train.embed alone: here f is the same vector for every
    sample, so ω is uniform (its row entropy ln B), whatever CLIP would say."""
    calls = []

    def same_f(args, embedder=None, prompts=None, images=None, halves=None, rows=None, device=None):
        calls.append("model" if device is not None else "halves" if halves is None else "f")
        return "no model" if device is not None else "no halves" if halves is None else torch.ones(rows, 8)

    monkeypatch.setattr(train, "embed", same_f)
    ds = __import__("data").build_dataset("toy", 16, num_items=16)
    batch = __import__("data").collate_pairs([ds[i] for i in range(4)])
    args = train.parse_args(["--loss", "rpo"])
    _, metrics = train.micro_batch_loss(M.load_models("tiny"), batch, torch.Generator().manual_seed(0), args,
                                        embedder=train.embed(args, device="cpu"))
    assert calls == ["model", "halves", "f"] and metrics["weight_entropy"] == pytest.approx(math.log(4))
