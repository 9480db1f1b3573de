"""--data hf:DIR|ID[#SCHEMA] (pickapic.open_pairs): every built-in schema written as small parquet
shards (Pick-a-Pic's binary columns with pyarrow; open-image-preferences and HPDv2 through datasets'
Image feature, i.e. {bytes, path} structs), read both as local shards (ParquetPairs) and through the
datasets streaming path (HubPairs on the same folder): winner/loser, ties dropped and counted, text
in an image column refused and never opened, and the one-line errors when the hub cannot be reached."""
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import data
from plumbing import pickapic
import train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(colour, fmt="PNG", size=(20, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def colour(r, side):
    return (30 + 40 * r, 100, 50 if side == 0 else 210)


# (prompt, which image is preferred: 0 the first, 1 the second, "tie", or "text": the first image
# cell names a real PNG file instead of holding bytes; it must be refused, never opened)
ROWS = [("a", 0), ("b", 1), ("tie", "tie"), ("text", "text"), ("d", 0), ("e", 1)]


def expected_pairs():
    """prompt -> (winner colour, loser colour) for the rows that must come out as pairs."""
    return {p: (colour(r, w), colour(r, 1 - w)) for r, (p, w) in enumerate(ROWS) if w in (0, 1)}


def lure(folder):
    """A real image file whose path sits in the "text" rows: reading it would yield a pair."""
    path = folder / "lure.png"
    Image.new("RGB", (20, 16), (255, 0, 255)).save(path)
    return str(path)


def write_pickapic(folder):
    """caption, jpg_0, jpg_1 (JPEG bytes), label_0; the "text" row is a second shard whose image
    columns are strings (file paths), as a careless export would write them."""
    folder.mkdir(parents=True)
    rows = [(r, p, w) for r, (p, w) in enumerate(ROWS) if w != "text"]
    label = {0: 1.0, 1: 0.0, "tie": 0.5}
    pq.write_table(pa.table({"caption": [p for _, p, _ in rows],
                             "jpg_0": [encoded(colour(r, 0), "JPEG") for r, _, _ in rows],
                             "jpg_1": [encoded(colour(r, 1), "JPEG") for r, _, _ in rows],
                             "label_0": [label[w] for _, _, w in rows], "label_1": [1 - label[w] for _, _, w in rows]}),
                   folder / "train-00000-of-00002.parquet", row_group_size=2)
    path = lure(folder.parent)
    pq.write_table(pa.table({"caption": ["text"], "jpg_0": [path], "jpg_1": [path], "label_0": [1.0], "label_1": [0.0]}),
                   folder / "train-00001-of-00002.parquet")
    return folder


def write_with_datasets(folder, features, rows, shards=2):
    """Rows through datasets' own parquet writer (Image features as {bytes, path} structs and the
    features in the file's metadata, as on the hub), in the hub's file names under data/."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    (folder / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))
    return folder


def write_oip(folder):
    """open-image-preferences-v1-binarized's columns, as its card lists them: id, prompt, chosen,
    rejected (Image with decode: false), chosen_model, rejected_model, evolution, category,
    sub_category; no label: chosen is the winner."""
    datasets = pytest.importorskip("datasets")
    path, rows = lure(folder.parent), []
    for r, (p, w) in enumerate(ROWS):
        if w == "tie":  # the binarized set has no ties: the row is a plain pair here
            w = 0
        cells = [{"bytes": encoded(colour(r, s)), "path": f"{r}-{s}.png"} for s in (0, 1)]
        if w == "text":
            w, cells[0] = 0, {"bytes": None, "path": path}
        rows.append({"id": f"{r}-quality", "prompt": p, "chosen": cells[w], "rejected": cells[1 - w],
                     "chosen_model": "black-forest-labs/FLUX.1-dev", "rejected_model": "stabilityai/stable-diffusion-3.5-large",
                     "evolution": "quality", "category": "Manga", "sub_category": "detailed"})
    s, img = datasets.Value("string"), datasets.Image(decode=False)
    return write_with_datasets(folder, {"id": s, "prompt": s, "chosen": img, "rejected": img, "chosen_model": s,
                                        "rejected_model": s, "evolution": s, "category": s, "sub_category": s}, rows)


def write_hpdv2(folder):
    """HPDv2's columns as its loading script (HPDv2.py) emits them and tools.hpdv2_to_parquet writes
    them: prompt, image (a list of two images),
    human_preference (1 for the preferred image), image_path, rank (unused); plus a row of three
    images (not a pair) and a row with no preference (its test split: a bad label)."""
    datasets = pytest.importorskip("datasets")
    path, rows = lure(folder.parent), []
    for r, (p, w) in enumerate(ROWS):
        cells = [{"bytes": encoded(colour(r, s)), "path": f"{r}-{s}.png"} for s in (0, 1)]
        pref = [1, 1] if w == "tie" else [1, 0] if w in (0, "text") else [0, 1]
        if w == "text":
            cells[0] = {"bytes": None, "path": path}
        rows.append({"prompt": p, "image": cells, "human_preference": pref, "image_path": [f"{r}-{s}.png" for s in (0, 1)],
                     "rank": []})
    three = [{"bytes": encoded((0, 0, 0)), "path": None}] * 3
    rows += [{"prompt": "three", "image": three, "human_preference": [1, 0], "image_path": [], "rank": []},
             {"prompt": "unranked", "image": three[:2], "human_preference": [], "image_path": [], "rank": [1, 2]}]
    s = datasets.Value("string")
    LIST = getattr(datasets, "List", datasets.Sequence)  # (datasets < 4 names it Sequence)
    return write_with_datasets(folder, {"prompt": s, "image": LIST(datasets.Image()),
                                        "human_preference": LIST(datasets.Value("int64")),
                                        "image_path": LIST(s), "rank": LIST(datasets.Value("int64"))},
                               rows)


WRITERS = {"pickapic": write_pickapic, "open-image-preferences": write_oip, "hpdv2": write_hpdv2}
INDEX_SKIPS = {  # counted when the shards are indexed
    "pickapic": {"tie": 1, "image is not bytes": 1},  # the text shard: refused from its column type
    "open-image-preferences": {},
    "hpdv2": {"tie": 1, "bad_label": 1},
}
READ_SKIPS = {  # met when a pair's images are read (skip markers)
    "pickapic": [],
    "open-image-preferences": ["image is not bytes"],  # the path-only struct: never opened
    "hpdv2": ["image is not bytes", "not a pair"],
}


def mean_colour(t):
    return tuple(((t.mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist())


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def check_pairs(items, name):
    pairs = {it["prompt"]: (mean_colour(it["winner"]), mean_colour(it["loser"])) for it in items if "skip" not in it}
    want = expected_pairs()
    if name == "open-image-preferences":
        want["tie"] = (colour(2, 0), colour(2, 1))  # no ties in a winner/loser schema
    assert sorted(pairs) == sorted(want), name
    for prompt, (w, lo) in pairs.items():
        assert close(w, want[prompt][0]) and close(lo, want[prompt][1]), (name, prompt, w, lo)


@pytest.mark.parametrize("name", list(WRITERS))
def test_local_shards_of_each_schema(tmp_path, name):
    folder = WRITERS[name](tmp_path / name)
    for spec in (f"hf:{folder}", f"hf:{folder}#{name}"):  # the schema found from the columns, or named
        ds = data.build_dataset(spec, 16)
        assert isinstance(ds, pickapic.ParquetPairs) and ds.schema == pickapic.SCHEMAS[name]
        assert ds.skip_counts == INDEX_SKIPS[name]
        items = [ds[i] for i in range(len(ds))]
        assert sorted(it["skip"].split(":")[0] for it in items if "skip" in it) == READ_SKIPS[name]
        check_pairs(items, name)
        assert all(it["original_size_w"] == (16, 20) for it in items if "skip" not in it)
        # row() (build-style's reader): bytes only, b"" where a cell held none (never a path)
        rows = [ds.row(i) for i in range(len(ds))]
        assert all(isinstance(raw, bytes) for _, cells, _ in rows for _, raw in cells)
        assert sum(any(raw == b"" for _, raw in cells) for _, cells, _ in rows) == len(READ_SKIPS[name])
    if name == "pickapic":  # the old spelling reads the same
        assert len(data.build_dataset(f"pickapic:{folder}", 16)) == len(ds)
    else:  # and forces Pick-a-Pic's columns, which these files lack
        with pytest.raises(ValueError, match="no usable preference pairs"):
            data.build_dataset(f"pickapic:{folder}", 16)


@pytest.mark.parametrize("name", list(WRITERS))
def test_streaming_path_of_each_schema(tmp_path, name):
    """HubPairs through datasets' streaming mode on the same shards (a local folder stands in for
    the hub id): the same pairs and skips, with the images never decoded by datasets."""
    pytest.importorskip("datasets")
    folder = WRITERS[name](tmp_path / name)
    if name == "pickapic":  # one schema per split for datasets: the text shard gets its own test below
        (folder / "train-00001-of-00002.parquet").unlink()
    hub = pickapic.HubPairs(str(folder), 16, shuffle_buffer=4)
    assert hub.schema == pickapic.SCHEMAS[name]
    n_rows = sum(pq.read_metadata(f).num_rows for f in folder.rglob("*.parquet"))
    items = [it for _, (_, it) in zip(range(n_rows), hub.stream(0))]
    skips = sorted(it["skip"].split(":")[0] for it in items if "skip" in it)
    want = sorted([k for k, n in INDEX_SKIPS[name].items() for _ in range(n)] + READ_SKIPS[name])
    assert skips == [s for s in want if not (name == "pickapic" and s == "image is not bytes")]
    check_pairs(items, name)


def test_text_in_image_columns_is_refused_not_read(tmp_path):
    """Image columns of text (here: the path of a real image) never load that file, on either path."""
    folder = tmp_path / "text"
    folder.mkdir()
    path = lure(tmp_path)
    pq.write_table(pa.table({"prompt": ["x", "y"], "chosen": [path, path], "rejected": [path, path]}),
                   folder / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"no usable preference pairs.*'image is not bytes': 2"):
        data.build_dataset(f"hf:{folder}", 16)
    pytest.importorskip("datasets")
    hub = pickapic.HubPairs(str(folder), 16)
    got = [it for _, (_, it) in zip(range(2), hub.stream(0))]
    assert [it["skip"].split(":")[0] for it in got] == ["image is not bytes"] * 2
    assert pickapic.image_bytes(path) is None and pickapic.image_bytes({"bytes": None, "path": path}) is None
    assert pickapic.image_bytes({"bytes": b"\x89PNG", "path": path}) == b"\x89PNG"


def test_column_mappings_and_spec_errors(tmp_path):
    folder = write_pickapic(tmp_path / "pp")
    same = data.build_dataset(f"hf:{folder}#prompt=caption,images=jpg_0+jpg_1,label=label_0", 16)
    assert len(same) == len(data.build_dataset(f"hf:{folder}", 16)) == 4
    flipped = data.build_dataset(f"hf:{folder}#prompt=caption,winner=jpg_1,loser=jpg_0", 16)
    assert len(flipped) == 5 and flipped.skip_counts == {"image is not bytes": 1}  # no label: no ties either
    it = next(flipped[i] for i in range(len(flipped)) if flipped[i]["prompt"] == "a")
    assert close(mean_colour(it["winner"]), colour(0, 1))  # jpg_1 named the winner
    for bad in ("#nosuch", "#prompt=caption,winner=jpg_1", "#prompt=caption,images=a+b+c,label=l", "#winner=a,loser=b"):
        with pytest.raises(ValueError, match="expected a schema") as e:
            data.build_dataset(f"hf:{folder}{bad}", 16)
        assert "\n" not in str(e.value)
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"text": ["x"], "img": [b"x"]}), other / "x.parquet")
    with pytest.raises(ValueError, match=r"its columns \(text, img\) fit no built-in schema"):
        data.build_dataset(f"hf:{other}", 16)
    with pytest.raises(FileNotFoundError, match="no folder"):
        data.build_dataset(f"hf:{tmp_path}/nowhere", 16)
    with pytest.raises(SystemExit) as e:  # no hub traffic: known to hold no labels
        data.build_dataset("hf:data-is-better-together/open-image-preferences-v1", 16)
    assert pickapic.DEFAULT_HUB in str(e.value) and "\n" not in str(e.value)


def test_hpdv2_as_published_through_the_converter(tmp_path):
    """ymhao/HPDv2 as its card lays it out (train.json: prompt, file_path, human_preference with 1
    for the preferred image; test.json: prompt, image_path, rank, smaller preferred; the images
    unpacked from the split's tar archive) -> python -m tools.hpdv2_to_parquet -> --data hf:DIR."""
    from tools import hpdv2_to_parquet as H
    hpd = tmp_path / "HPD"
    (hpd / "train").mkdir(parents=True)
    for r in range(5):
        for side in (0, 1):
            (hpd / "train" / f"{r}-{side}.jpg").write_bytes(encoded(colour(r, side), "JPEG"))
    (hpd / "lure.jpg").write_bytes(encoded((255, 0, 255), "JPEG"))  # outside the image folder: never read
    records = [
        {"human_preference": [1, 0], "prompt": "a", "file_path": ["0-0.jpg", "0-1.jpg"]},
        {"human_preference": [0, 1], "prompt": "b", "file_path": ["1-0.jpg", "1-1.jpg"]},
        {"human_preference": [1, 1], "prompt": "tie", "file_path": ["2-0.jpg", "2-1.jpg"]},
        {"human_preference": [1, 0], "prompt": "gone", "file_path": ["2-0.jpg", "nope.jpg"]},
        {"human_preference": [1, 0], "prompt": "escape", "file_path": ["../lure.jpg", "2-1.jpg"]},
        {"human_preference": [1, 0], "prompt": "", "file_path": ["0-0.jpg", "0-1.jpg"]},
        {"human_preference": [1, 0, 0], "prompt": "short", "file_path": ["0-0.jpg", "0-1.jpg"]},
        # three images, the middle one preferred: pairs (3-0, 3-1) -> the second, (3-0, 4-0) a tie,
        # (3-1, 4-0) -> the first
        {"human_preference": [0, 1, 0], "prompt": "three", "file_path": ["3-0.jpg", "3-1.jpg", "4-0.jpg"]},
    ]
    (hpd / "train.json").write_text(json.dumps(records))
    out = tmp_path / "parquet"
    H.main(["--json", str(hpd / "train.json"), "--images", str(hpd / "train"), "--out", str(out),
            "--shard_rows", "3", "--row_group_rows", "2"])
    assert sorted(os.listdir(out)) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    t = pq.read_table(out / "train-00000-of-00002.parquet")
    assert t.column_names == ["prompt", "image", "human_preference"]
    assert t.column("human_preference")[0].as_py() == [1, 0]
    assert [c["path"] for c in t.column("image")[1].as_py()] == ["1-0.jpg", "1-1.jpg"]
    ds = data.build_dataset(f"hf:{out}", 16)  # the hpdv2 schema, found from the columns
    assert ds.schema == pickapic.SCHEMAS["hpdv2"] and len(ds) == 4 and ds.skip_counts == {}
    items = [ds[i] for i in range(4)]
    got = sorted((it["prompt"], mean_colour(it["winner"]), mean_colour(it["loser"])) for it in items)
    want = sorted([("a", colour(0, 0), colour(0, 1)), ("b", colour(1, 1), colour(1, 0)),
                   ("three", colour(3, 1), colour(3, 0)), ("three", colour(3, 1), colour(4, 0))])
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(close(g[1], w[1]) and close(g[2], w[2]) for g, w in zip(got, want)), got
    written, skips = H.convert(str(hpd / "train.json"), str(hpd / "train"), str(tmp_path / "again"))
    assert written == 4 and skips == {"tie": 2, "missing image": 1, "path outside --images": 1, "not a record": 2}
    # test.json: ranks over several images, smaller = preferred
    test = [{"prompt": "r", "image_path": ["0-0.jpg", "0-1.jpg", "1-0.jpg"], "rank": [2, 1, 3],
             "raw_annotations": [{"rank": [2, 1, 3], "user_hash": "u"}]}]
    (hpd / "test.json").write_text(json.dumps(test))
    assert H.convert(str(hpd / "test.json"), str(hpd / "train"), str(tmp_path / "test"), split="test") == (3, {})
    ds = data.build_dataset(f"hf:{tmp_path / 'test'}", 16, split="test")
    pairs = sorted((mean_colour(it["winner"]), mean_colour(it["loser"])) for it in (ds[i] for i in range(len(ds))))
    want = sorted([(colour(0, 1), colour(0, 0)), (colour(0, 0), colour(1, 0)), (colour(0, 1), colour(1, 0))])
    assert len(pairs) == 3 and all(close(a, c) and close(b, d) for (a, b), (c, d) in zip(pairs, want))
    # one-line errors
    for js, images, needle in ((tmp_path / "none.json", hpd / "train", "cannot read"),
                               (hpd / "train.json", tmp_path / "nowhere", "no such folder")):
        with pytest.raises(SystemExit, match=needle) as e:
            H.main(["--json", str(js), "--images", str(images), "--out", str(tmp_path / "x")])
        assert "\n" not in str(e.value)
    (hpd / "empty.json").write_text("[]")
    with pytest.raises(SystemExit, match="no pairs written"):
        H.main(["--json", str(hpd / "empty.json"), "--images", str(hpd / "train"), "--out", str(tmp_path / "y")])


def test_default_data_exists_and_maps_to_a_schema():
    assert pickapic.DEFAULT_DATA == "hf:data-is-better-together/open-image-preferences-v1-binarized"
    assert pickapic.schema_for_id(pickapic.DEFAULT_HUB).name == "open-image-preferences"
    assert pickapic.schema_for_id("yuvalkirstain/pickapic_v2").name == "pickapic"
    assert pickapic.schema_for_id("ymhao/HPDv2").name == "hpdv2"


def offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # = HF_HUB_OFFLINE=1, without network timeouts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_is_one_line_naming_the_alternatives(monkeypatch):
    offline(monkeypatch)
    with pytest.raises(SystemExit) as e:
        data.build_dataset("hf:yuvalkirstain/pickapic_v2", 16)
    msg = str(e.value)
    assert msg.startswith("error: cannot stream the data set 'yuvalkirstain/pickapic_v2' (no hub access: offline")
    assert "\n" not in msg and "no longer on the hub" in msg
    assert f"hf:{pickapic.DEFAULT_HUB}" in msg and "hf:pickapic-anonymous/pickapic_v1" in msg and "hf:DIR#hpdv2" in msg
    # the gone id is not what to download: the same columns from a set that exists
    assert "hf download --repo-type dataset pickapic-anonymous/pickapic_v1 --local-dir /path/to/folder" in msg
    assert msg.endswith("--data hf:/path/to/folder")
    with pytest.raises(SystemExit) as e:
        data.build_dataset(pickapic.DEFAULT_DATA, 16)
    assert f"hf download --repo-type dataset {pickapic.DEFAULT_HUB} --local-dir" in str(e.value)
    assert f"'{pickapic.DEFAULT_HUB}'" in str(e.value) and f"hf:{pickapic.DEFAULT_HUB} (" not in str(e.value)


def test_gone_data_set_is_one_line(monkeypatch):
    """A 404 (what the hub answers for yuvalkirstain/pickapic_v2), simulated: datasets' own exception."""
    datasets = pytest.importorskip("datasets")

    def not_found(path, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
    monkeypatch.setattr(datasets, "load_dataset", not_found)
    monkeypatch.setattr(pickapic.hub, "unreachable", lambda *a, **k: None)  # the hub answers (a 404)
    with pytest.raises(SystemExit) as e:
        data.build_dataset("hf:someone/misspelled", 16)
    msg = str(e.value)
    assert "(not on the hub: removed, private or misspelled)" in msg and "\n" not in msg
    assert f"hf download --repo-type dataset {pickapic.DEFAULT_HUB} --local-dir" in msg  # not the missing id


@pytest.mark.parametrize("spec", [pickapic.DEFAULT_DATA, "hf:yuvalkirstain/pickapic_v2"])
def test_train_offline_ends_with_one_line(tmp_path, spec):
    """The real thing: HF_HUB_OFFLINE=1 and a real preset; the data is checked before any model loads."""
    pytest.importorskip("datasets")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "train.py", "--model", "sdxl", "--data", spec, "--no_progress",
                        "--out_dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot stream the data set"), r.stderr
    assert "hf download --repo-type dataset" in lines[0] and "offline" in lines[0]


def test_train_on_local_shards_counts_refused_images(tmp_path):
    folder = write_oip(tmp_path / "oip")
    out = tmp_path / "run"
    train.main(["--data", f"hf:{folder}", "--batch_size", "2", "--max_steps", "3", "--resolution", "16",
                "--out_dir", str(out), "--no_progress", "--shuffle_window", "1"])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(records) == 3 and records[-1]["skipped"] == {"image is not bytes": 1}  # 6 pairs: one epoch in 3 steps
