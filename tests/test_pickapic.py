"""Pick-a-Pic v2 from parquet shards (pickapic:DIR, pickapic.PickapicParquet = ParquetPairs), the hub path
(pickapic.PickapicHub = HubPairs, via the datasets library on local files), and train.py on them: exact
pairs, skips, DDP sharding. The other schemas and the hf: spelling: tests/test_hubdata.py."""
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from plumbing import pickapic

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def jpeg(colour, size=(24, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def colour(f, r, side):
    """A solid colour naming (file, row, image side): JPEG keeps solid colours within a few levels."""
    return (40 + 60 * f, 20 + 20 * r, 60 if side == 0 else 200)


# Each file: (label_0, caption, corrupt side or None) per row, written with 3 rows per row group.
ROWS = {
    0: [(1, "a", None), (0, "b", None), (0.5, "tie", None), (1, "", None), (0, "c", 1), (1, "d", None), (0, "e", None)],
    1: [(0.5, "tie2", None), (1, "f", None), (0, "g", None), (1, None, None)],
}


def write_shards(folder):
    """Pick-a-Pic's hub layout: train-0000N-of-0000M.parquet (+ a test shard that must be ignored,
    and a train shard without label_0: its rows are counted skips)."""
    folder.mkdir(exist_ok=True)
    for f, rows in ROWS.items():
        jpg = {s: [b"\xff\xd8 not a jpeg" if bad == s else jpeg(colour(f, r, s))
                   for r, (_, _, bad) in enumerate(rows)] for s in (0, 1)}
        table = pa.table({"caption": [c for _, c, _ in rows], "jpg_0": jpg[0], "jpg_1": jpg[1],
                          "label_0": [float(lab) for lab, _, _ in rows], "label_1": [1 - float(lab) for lab, _, _ in rows],
                          "best_image_uid": [f"uid{f}{r}" for r in range(len(rows))]})
        pq.write_table(table, folder / f"train-{f:05d}-of-00003.parquet", row_group_size=3)
    pq.write_table(pa.table({"caption": ["x", "y"], "jpg_0": [jpeg((0, 0, 0))] * 2, "jpg_1": [jpeg((0, 0, 0))] * 2}),
                   folder / "train-00002-of-00003.parquet")
    pq.write_table(pa.table({"caption": ["z"], "jpg_0": [jpeg((0, 0, 0))], "jpg_1": [jpeg((9, 9, 9))], "label_0": [1.0]}),
                   folder / "test-00000-of-00001.parquet")
    # usable pairs: file 0 rows 0, 1, 4 (corrupt when decoded), 5, 6; file 1 rows 1, 2
    expected = {}
    for f, rows in ROWS.items():
        for r, (lab, cap, _) in enumerate(rows):
            if cap and lab != 0.5:
                expected[cap] = (colour(f, r, 0 if lab == 1 else 1), colour(f, r, 1 if lab == 1 else 0))
    return expected


def mean_colour(t):
    return tuple(((t.mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist())


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_exact_pairs_and_skip_counts(tmp_path):
    expected = write_shards(tmp_path / "pp")
    ds = data.build_dataset(f"pickapic:{tmp_path / 'pp'}", 16)
    assert isinstance(ds, pickapic.PickapicParquet) and len(ds) == len(expected) == 7
    # ties 2, empty/missing captions 2, the shard without label_0: its 2 rows; test split ignored
    assert ds.skip_counts == {"tie": 2, "missing_field": 2, "missing_column": 2}
    seen, markers = {}, []
    for i in range(len(ds)):
        it = ds[i]
        if "skip" in it:
            markers.append(it["skip"])
            continue
        seen[it["prompt"]] = (mean_colour(it["winner"]), mean_colour(it["loser"]))
        assert it["original_size_w"] == (20, 24) and it["winner"].shape == (3, 16, 16)
    assert len(markers) == 1 and markers[0].startswith("corrupt image: ") and "row group 1 row 1 jpg_1" in markers[0]
    assert sorted(seen) == sorted(set(expected) - {"c"})
    for cap, (w, lo) in seen.items():  # winner = jpg_0 when label_0 == 1, else jpg_1
        assert close(w, expected[cap][0]) and close(lo, expected[cap][1]), cap
    assert len(ds._cache) <= ds.window + 1  # memory: a few row groups, not the data set


def test_ranks_read_disjoint_row_groups_and_stop_together(tmp_path):
    write_shards(tmp_path / "pp")
    ds = pickapic.PickapicParquet(tmp_path / "pp", 16, seed=3, window=1)
    for epoch in range(3):
        one = [i for b in ds.epoch_batches(epoch, 0, 1, 1) for i in b]
        assert sorted(one) == list(range(len(ds)))  # one rank, batch 1: every pair once
        per_rank = [ds.epoch_batches(epoch, r, 2, 2) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) >= 1  # same number of batches on every rank
        items = [[i for b in batches for i in b] for batches in per_rank]
        assert not set(items[0]) & set(items[1])  # no pair seen twice in an epoch
        unit = lambda i: int(np.searchsorted(ds.starts, i, side="right") - 1)
        assert not {unit(i) for i in items[0]} & {unit(i) for i in items[1]}  # whole row groups per rank
    assert ds.epoch_batches(0, 0, 1, 1) != ds.epoch_batches(1, 0, 1, 1)  # reshuffled per epoch


def test_train_counts_skips_in_metrics(tmp_path):
    write_shards(tmp_path / "pp")
    out = tmp_path / "run"
    train.main(["--data", f"pickapic:{tmp_path / 'pp'}", "--batch_size", "2", "--max_steps", "5", "--resolution", "16",
                "--out_dir", str(out), "--no_progress", "--shuffle_window", "1"])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # 7 pairs, 2 a batch: an epoch deals 6 of them, 3 batches; an epoch that deals the corrupt pair
    # reads past it, counted, and has 2 (5 readable pairs: the 5th is dropped with the epoch's end)
    assert records[-1]["skipped"]["tie"] == 2 and records[-1]["skipped"]["missing_column"] == 2
    assert records[-1]["skipped"]["missing_field"] == 2
    ds = pickapic.PickapicParquet(tmp_path / "pp", 16, seed=0, window=1)
    corrupt = next(i for i in range(len(ds)) if "skip" in ds[i])
    dealt = corrupt in [i for b in ds.epoch_batches(0, 0, 1, 2) for i in b]
    first = 2 if dealt else 3  # epoch 1's first step, where epoch 0's end is recorded too
    assert [r["epoch"] for r in records[:first + 1]] == [0] * first + [1] and records[first]["skipped"]["tie"] == 2
    assert records[first]["skipped"].get("corrupt image", 0) == int(dealt)
    assert records[-1]["skipped"].get("corrupt image", 0) >= 1


def test_missing_pyarrow_and_bad_folder_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", f"pickapic:{tmp_path}/nowhere", "--out_dir", str(tmp_path / "o")])
    assert "no folder" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(["--data", f"pickapic:{tmp_path / 'empty'}", "--out_dir", str(tmp_path / "o")])
    assert "no train-*.parquet" in str(e.value)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit) as e:
        pickapic.PickapicParquet(tmp_path / "empty")
    assert "pip install pyarrow" in str(e.value)


def test_hub_path_streams_with_datasets(tmp_path):
    pytest.importorskip("datasets")
    expected = write_shards(tmp_path / "pp")
    (tmp_path / "pp" / "train-00002-of-00003.parquet").unlink()  # datasets wants one schema per split
    hub = pickapic.PickapicHub(str(tmp_path / "pp"), 16, shuffle_buffer=4)
    got = []
    for epoch, it in hub.stream(0):
        got.append((epoch, it))
        if len(got) == 2 * 11:  # two epochs of the 11 train rows
            break
    assert [e for e, _ in got] == [0] * 11 + [1] * 11
    first = [it for _, it in got[:11]]
    skips = sorted(it["skip"].split(":")[0] for it in first if "skip" in it)
    assert skips == ["corrupt image", "missing_field", "missing_field", "tie", "tie"]
    pairs = {it["prompt"]: (mean_colour(it["winner"]), mean_colour(it["loser"])) for it in first if "skip" not in it}
    assert sorted(pairs) == sorted(set(expected) - {"c"})
    for cap, (w, lo) in pairs.items():
        assert close(w, expected[cap][0]) and close(lo, expected[cap][1]), cap
    # resuming skips the rows already read: the same rows follow, in either epoch's order
    name = lambda it: it.get("prompt", it.get("skip"))
    for epoch, rows in ((0, first), (1, [it for _, it in got[11:]])):
        rest = [it for _, (_, it) in zip(range(7), hub.stream(epoch, skip_rows=4))]
        assert [name(it) for it in rest] == [name(it) for it in rows[4:11]]
    assert [name(it) for it in first] != [name(it) for _, it in got[11:]]  # epochs are reshuffled


def test_hub_without_datasets_or_network_is_one_line(monkeypatch):
    # the pickapic: alias keeps its own prefix in the hints (the hf: spelling: tests/test_hubdata.py)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit) as e:
        data.build_dataset("pickapic:yuvalkirstain/pickapic_v2", 16)
    assert "pip install datasets" in str(e.value) and "pickapic:/path/to/folder" in str(e.value)
    monkeypatch.undo()
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    # the same failure as a machine without network, without waiting for its timeouts
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        data.build_dataset("pickapic:no-such-user/no-such-dataset-xyz", 16)
    msg = str(e.value)
    assert msg.startswith("error: cannot stream the data set") and "pickapic:/path/to/folder" in msg and "\n" not in msg
    assert "offline" in msg and pickapic.DEFAULT_HUB in msg


def test_resume_on_shards_replays_the_same_pairs(tmp_path):
    """Stop at step 2 (mid-epoch) and resume: the same weights and log as a straight run."""
    from safetensors.torch import load_file
    write_shards(tmp_path / "pp")
    common = ["--data", f"pickapic:{tmp_path / 'pp'}", "--batch_size", "2", "--resolution", "16", "--lr", "1e-3",
              "--shuffle_window", "1", "--random_crop", "--random_flip", "--no_progress"]
    train.main(common + ["--max_steps", "5", "--out_dir", str(tmp_path / "straight")])
    train.main(common + ["--max_steps", "2", "--out_dir", str(tmp_path / "split")])
    train.main(common + ["--max_steps", "5", "--out_dir", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line)["mse_w"] for line in open(tmp_path / run / "metrics.jsonl")] for run in ("straight", "split")]
    assert logs[0] == logs[1]


def test_a_split_asked_of_a_folder_without_splits_is_one_line(tmp_path):
    # Before: shards not named SPLIT-0000N-of-0000M were all read whatever --data_split said, so
    # --data_split test trained on every file without a word. The default (train) reads them whole.
    write_shards(tmp_path / "d")
    for f in sorted((tmp_path / "d").glob("*.parquet")):
        f.rename(f.with_name(f.name.replace("-of-", "_of_")))
    assert len(pickapic.ParquetPairs(tmp_path / "d")) > 0  # (no split in the names: read whole)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", f"hf:{tmp_path / 'd'}", "--data_split", "test", "--out_dir", str(tmp_path / "o")])
    assert str(e.value) == (f"error: --data_split test: the .parquet files under {tmp_path / 'd'} are not named for "
                            f"splits (SPLIT-00000-of-00005.parquet); a folder without splits is read whole, as "
                            f"--data_split train")
    assert not (tmp_path / "o").exists()
