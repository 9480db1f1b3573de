"""docs/fork.md's example objective, run as written: its code added to loss.py's namespace, the
flags derived from the list, k = 1 with text embeddings equal to DPO, a short run and its resume."""
import json
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
        train.parse_args(["--loss", "rpo_topk", "--topk", "0"])  # a positive number, checked like every setting


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
    assert "weight_diag" in capsys.readouterr().out  # its diagnostics on the log line
    assert json.load(open(out / "args.json"))["topk"] == 2
    assert "topk = 2" in open(out / "README.md").read()  # the model card names its settings
    with pytest.raises(SystemExit, match="topk"):  # a setting it reads may not change mid-run
        train.main(base[:3] + ["3"] + base[4:] + ["--max_steps", "3", "--resume"])
    train.main(base + ["--max_steps", "3", "--resume"])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def objective_rows():
    """docs/flags.md's objective rows, as loss.OBJECTIVES and loss.SETTINGS define them."""
    rows = ["| objective | `--loss` | `rpo` | " + "; ".join(f"`{k}`: {o['about']}" for k, o in L.OBJECTIVES.items())
            + " |"]
    for name, s in L.SETTINGS.items():
        choices = f" (`{'`, `'.join(s['choices'])}`)" if s["choices"] else ""
        default = "the objective's" if s["default"] is None else f"`{s['default']:g}`" if isinstance(
            s["default"], float) else f"`{s['default']}`"
        rows.append(f"| | `--{name}` | {default} | {s['help']}{choices}; read by: {L.readers(name)} |")
    return rows


def test_flags_doc_lists_the_objectives_as_the_list_defines_them():
    text = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    block = text.split("<!-- objective rows: from loss.OBJECTIVES and loss.SETTINGS (tests/test_fork.py checks them) -->\n")[1]
    assert block.startswith("\n".join(objective_rows()) + "\n"), "\n".join(objective_rows())
