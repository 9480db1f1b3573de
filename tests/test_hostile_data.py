"""Hostile data: every PIL pixel mode decoded by its real range, the pixel budget (draft, reduce,
refusals), manifests with bad bytes or unencodable prompts, corrupt images named once, and
damaged caches refused with one line naming the file."""
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import cache  # noqa: E402
import data  # noqa: E402
from tools import build_cache
from plumbing import image_files  # noqa: E402
import train  # noqa: E402
from data import ManifestPairs  # noqa: E402
from plumbing.images import image_to_tensor  # noqa: E402
from plumbing import tiny  # noqa: E402
from plumbing.image_files import decode_image, read_image  # noqa: E402


def reopen(tmp_path, name, img, mode):
    """Save with PIL, open from disk: the test checks the mode the file really opens as (one of
    `mode`, "|"-separated: older Pillow opens a 16-bit PNG as I, newer as I;16)."""
    img.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode in mode.split("|")
    return tmp_path / name


def grey(path):
    """decode_image's RGB output of a one-row image, as the list of its (equal) channels."""
    out = np.asarray(decode_image(path))
    assert out.dtype == np.uint8 and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    return out[0, :, 0].tolist()


def warnings_of(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


# ---------------------------------------------------------------------------- 1. pixel modes

def test_16bit_png_and_tiff_scale_by_257(tmp_path):
    # Before: convert("RGB") clipped every value above 255 -> a 16-bit photo was 99.6% white.
    row = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    for name in ("a.png", "a.tif"):
        path = reopen(tmp_path, name, Image.fromarray(row), "I;16|I")
        assert grey(path) == [0, 1, 4, 128, 255]  # 1000 / 257 = 3.9 -> 4


def test_32bit_int_tiff_by_its_range(tmp_path):
    cases = {
        "eight.tif": ([0, 100, 255], [0, 100, 255]),  # max <= 255: already 8-bit values
        "sixteen.tif": ([0, 300, 65535], [0, 1, 255]),  # max <= 65535: 16-bit, / 257
        "wide.tif": ([-5, 1_000_000, 4_000_000], [0, 64, 255]),  # larger: own max -> 255 (63.75)
    }
    for name, (values, want) in cases.items():
        path = reopen(tmp_path, name, Image.fromarray(np.array([values], dtype=np.int32)), "I")
        assert grey(path) == want, name


def test_float_tiff_unit_or_byte_range(tmp_path):
    # Before: a float TIFF in [0, 1] trained as black.
    unit = np.array([[0.0, 0.25, 1.0, np.nan, -0.5]], dtype=np.float32)
    assert grey(reopen(tmp_path, "unit.tif", Image.fromarray(unit), "F")) == [0, 64, 255, 0, 0]
    byte = np.array([[0.0, 100.4, 300.0, 2.0]], dtype=np.float32)  # max > 1: [0, 255], clipped
    assert grey(reopen(tmp_path, "byte.tif", Image.fromarray(byte), "F")) == [0, 100, 255, 2]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * 759)
    p.putdata([0, 1, 2])
    plain = reopen(tmp_path, "p.png", p, "P")
    assert np.asarray(decode_image(plain))[0].tolist() == [[10, 20, 30], [200, 100, 0], [0, 0, 255]]
    p.save(tmp_path / "t.png", transparency=1)  # index 1 transparent: white, not (200, 100, 0)
    assert Image.open(tmp_path / "t.png").mode == "P"
    assert np.asarray(decode_image(tmp_path / "t.png"))[0].tolist() == [[10, 20, 30], [255] * 3, [0, 0, 255]]
    p.save(tmp_path / "t.gif", transparency=2)
    assert np.asarray(decode_image(tmp_path / "t.gif"))[0].tolist() == [[10, 20, 30], [200, 100, 0], [255] * 3]


def test_alpha_composited_on_white(tmp_path):
    # round(c·a + 255·(1 - a)): alpha 0 -> white, 255 -> the colour, 128 of 100 -> 177
    rgba = np.array([[[100, 50, 0, 0], [100, 50, 0, 255], [100, 50, 0, 128]]], dtype=np.uint8)
    path = reopen(tmp_path, "rgba.png", Image.fromarray(rgba), "RGBA")
    assert np.asarray(decode_image(path))[0].tolist() == [[255, 255, 255], [100, 50, 0], [177, 152, 127]]
    la = np.array([[[100, 0], [100, 255], [100, 128]]], dtype=np.uint8)
    path = reopen(tmp_path, "la.png", Image.fromarray(la, "LA"), "LA")
    assert grey(path) == [255, 100, 177]
    # a grey PNG with a transparent grey level (tRNS): that level is white
    Image.fromarray(np.array([[7, 8]], dtype=np.uint8)).save(tmp_path / "lt.png", transparency=7)
    assert grey(tmp_path / "lt.png") == [255, 8]


def test_cmyk_grey_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    path = reopen(tmp_path, "c.tif", cmyk, "CMYK")
    assert np.asarray(decode_image(path))[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    grey_row = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert grey(reopen(tmp_path, "l.png", grey_row, "L")) == [0, 77, 255]
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 1])
    assert grey(reopen(tmp_path, "b.png", bits, "1")) == [0, 255]


def test_16bit_pair_trains_with_its_real_values(tmp_path):
    # Through ManifestPairs: a mid-grey 16-bit winner is mid-grey in the tensor, not white.
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(tmp_path / "l.tif")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "p", "winner": "w.png", "loser": "l.tif"}) + "\n")
    it = ManifestPairs(tmp_path / "m.jsonl", resolution=8)[0]
    assert torch.equal(it["winner"], image_to_tensor(np.full((8, 8, 3), 128, dtype=np.uint8)))
    assert torch.equal(it["loser"], image_to_tensor(np.full((8, 8, 3), 64, dtype=np.uint8)))


# ---------------------------------------------------------------------------- 2. pixel budget

def test_thin_strip_refused_at_the_header(tmp_path, capsys):
    Image.new("RGB", (1, 3000), (1, 2, 3)).save(tmp_path / "strip.png")  # took 25 s and 6.5 GB at 512 px
    start = time.perf_counter()
    assert read_image(tmp_path / "strip.png", 512) == (None, ("extreme aspect ratio", "1x3000, more than 20:1"))
    assert time.perf_counter() - start < 0.5
    assert decode_image(tmp_path / "strip.png") is None  # without a resolution too
    Image.new("RGB", (60, 3), (1, 2, 3)).save(tmp_path / "ok.png")  # 20:1 exactly is allowed
    assert decode_image(tmp_path / "ok.png", 8).size == (60, 3)


def test_big_jpeg_decoded_by_draft(tmp_path):
    y, x = np.mgrid[0:3000, 0:4000]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "big.jpg")
    img = decode_image(tmp_path / "big.jpg", 512)
    # Image.draft at 1/4: shorter side 750, in [512, 1024); reduce alone would give 800x600 (1/5)
    assert img.size == (1000, 750) and img.mode == "RGB" and img.info["original_size"] == (4000, 3000)
    assert decode_image(tmp_path / "big.jpg").size == (4000, 3000)  # no resolution: full size
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "p", "winner": "big.jpg", "loser": "big.jpg"}) + "\n")
    it = ManifestPairs(tmp_path / "m.jsonl", resolution=512)[0]
    # SDXL's size conditioning keeps the true size (h, w); the crop is in the 683x512 resize
    assert it["original_size_w"] == it["original_size_l"] == (3000, 4000)
    assert it["crop_top_left"] == (0, 85) and it["winner"].shape == (3, 512, 512)


def test_big_png_box_reduced_first(tmp_path):
    Image.new("RGB", (1200, 900), (40, 80, 120)).save(tmp_path / "big.png")
    img = decode_image(tmp_path / "big.png", 100)
    # factor 900 // (2 * 100) = 4: 300x225, shorter side in [200, 400); the bicubic does the rest
    assert img.size == (300, 225) and img.info["original_size"] == (1200, 900)
    assert np.asarray(img)[0, 0].tolist() == [40, 80, 120]
    assert decode_image(tmp_path / "big.png", 500).size == (1200, 900)  # under 2R: untouched
    # a 16-bit image (no Image.reduce for I;16) is converted first, then reduced: same values
    Image.fromarray(np.full((900, 1200), 257 * 9, dtype=np.uint16)).save(tmp_path / "big16.png")
    img = decode_image(tmp_path / "big16.png", 100)
    assert img.size == (300, 225) and np.asarray(img)[5, 5].tolist() == [9, 9, 9]


def test_pixel_budget_counts_decoded_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(image_files, "MAX_PIXELS", 10_000)
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", 16) == (None, ("image too large",
                                                           "200x100 = 0.0 MP, over the 0.01 MP budget"))
    Image.new("RGB", (400, 300), (9, 9, 9)).save(tmp_path / "big.jpg")
    assert read_image(tmp_path / "big.jpg")[1][0] == "image too large"  # 120 000 pixels at full size
    assert decode_image(tmp_path / "big.jpg", 50).size == (100, 75)  # drafted to 1/4: 7 500 pixels


def test_decompression_bomb_guard_kept(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above twice this
    img, (kind, detail) = read_image(tmp_path / "bomb.png", 16)
    assert img is None and kind == "image too large" and detail.startswith("Image size (10000 pixels) exceeds")


# ---------------------------------------------------------------------------- 3. manifests

def write_images(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "x.png").write_bytes(b"not a png")
    (tmp_path / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken too")
    Image.new("RGB", (1, 3000)).save(tmp_path / "strip.png")


def test_bad_bytes_skip_one_line_not_the_manifest(tmp_path, capsys):
    write_images(tmp_path)
    good = json.dumps({"prompt": "café", "winner": "ok.png", "loser": "ok.png"}).encode()
    latin1 = b'{"prompt": "caf\xe9", "winner": "ok.png", "loser": "ok.png"}'
    # UTF-8 BOM on line 1, CRLF, a lone CR as a line break, a Latin-1 line (3) and a cut one (5)
    body = b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r" + latin1 + b"\n" + good + b"\n" + good[:-3] + b"\xc3\n"
    (tmp_path / "m.jsonl").write_bytes(body)
    ds = ManifestPairs(tmp_path / "m.jsonl", resolution=8)
    assert len(ds) == 3 and ds.skip_counts == {"bad_encoding": 2}
    assert [p for p, _, _ in ds.pairs] == ["café"] * 3
    assert warnings_of(capsys) == [f"warning: {tmp_path / 'm.jsonl'}: skipped 2 lines that are not valid UTF-8 "
                                   f"(first: {tmp_path / 'm.jsonl'}:3 'byte 0xe9 at column 16')"]


def test_deeply_nested_json_is_a_bad_line(tmp_path):
    write_images(tmp_path)
    good = json.dumps({"prompt": "p", "winner": "ok.png", "loser": "ok.png"})
    (tmp_path / "m.jsonl").write_text(good + "\n" + "[" * 100_000 + "\n")  # RecursionError in json
    ds = ManifestPairs(tmp_path / "m.jsonl", resolution=8)
    assert len(ds) == 1 and ds.skip_counts == {"bad_json": 1}


def test_unencodable_prompt_is_skipped_at_index_time(tmp_path, capsys):
    write_images(tmp_path)
    m = tmp_path / "m.jsonl"
    m.write_text('{"prompt": "fine", "winner": "ok.png", "loser": "ok.png"}\n'
                 '{"prompt": "bad \\ud800 surrogate", "winner": "ok.png", "loser": "ok.png"}\n'
                 '{"caption": "\\udfff", "image_0": "ok.png", "image_1": "ok.png", "label_0": 1}\n'
                 '{"prompt": "a \\ud83d\\ude00 pair is fine", "winner": "ok.png", "loser": "ok.png"}\n')
    ds = ManifestPairs(m, resolution=8)
    assert ds.skip_counts == {"bad_prompt": 2} and [p for p, _, _ in ds.pairs] == ["fine", "a \U0001F600 pair is fine"]
    assert warnings_of(capsys) == [f"warning: {m}: skipped 2 lines with a prompt that is not valid text "
                                   f"(a lone surrogate escape) (first: {m}:2 'bad \\ud800 surrogate')"]
    batch = data.collate_pairs([ds[0], ds[1]])
    assert tiny.tiny_tokenizer()(batch["prompt"]).input_ids  # what crashed at the batch before


def test_each_bad_image_named_once(tmp_path, capsys):
    write_images(tmp_path)
    rec = lambda w, l: {"prompt": "p", "winner": w, "loser": l}
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in [
        rec("ok.png", "x.png"), rec("x.png", "ok.png"), rec("ok.png", "ok.png"), rec("y.png", "x.png"),
        rec("strip.png", "ok.png"), rec("ok.png", "strip.png")]))
    ds = ManifestPairs(m, resolution=8)
    capsys.readouterr()
    markers = [[ds[i].get("skip") for i in range(len(ds))] for _ in range(2)]  # two epochs
    assert markers[0] == markers[1] == [
        f"corrupt image: {tmp_path / 'x.png'}", f"corrupt image: {tmp_path / 'x.png'}", None,
        f"corrupt image: {tmp_path / 'y.png'}", f"extreme aspect ratio: {tmp_path / 'strip.png'}",
        f"extreme aspect ratio: {tmp_path / 'strip.png'}"]
    warns = warnings_of(capsys)
    assert [w.split(":")[1].strip() for w in warns] == [str(tmp_path / n) for n in ("x.png", "y.png", "strip.png")]
    assert warns[0] == (f"warning: {tmp_path / 'x.png'}: corrupt image (cannot identify image file "
                        f"'{tmp_path / 'x.png'}'); pairs using it are skipped")
    assert warns[2] == (f"warning: {tmp_path / 'strip.png'}: extreme aspect ratio (1x3000, more than 20:1); "
                        f"pairs using it are skipped")


def test_train_survives_a_hostile_manifest(tmp_path, capsys):
    """train.py end to end: bad lines counted at start, bad images counted by kind, no traceback."""
    write_images(tmp_path)
    Image.new("RGB", (20, 16), (0, 90, 0)).save(tmp_path / "g.png")
    good = {"prompt": "a red circle", "winner": "ok.png", "loser": "g.png"}
    lines = [json.dumps(good).encode()] * 4 + [
        b'{"prompt": "\xff", "winner": "ok.png", "loser": "g.png"}',
        json.dumps({**good, "prompt": "\ud800"}).encode(),  # ASCII: the surrogate is written \ud800
        json.dumps({**good, "loser": "x.png"}).encode(), json.dumps({**good, "winner": "strip.png"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "run"
    train.main(["--data", str(tmp_path / "m.jsonl"), "--batch_size", "2", "--max_steps", "4", "--resolution", "16",
                "--out_dir", str(out), "--no_progress"])
    skipped = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]["skipped"]
    assert skipped["bad_encoding"] == 1 and skipped["bad_prompt"] == 1
    assert skipped["corrupt image"] >= 1 and skipped["extreme aspect ratio"] >= 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"{tmp_path / 'x.png'}: corrupt image") == 1


def test_unreadable_pairs_leave_batches_full_and_resumes_exact(tmp_path, monkeypatch):
    """train.py on a manifest with 3 unreadable pairs in 10: every micro-batch holds --batch_size
    pairs, the pairs read past are counted, and a run resumed from a checkpoint whose position
    counts pairs read past ends bit for bit as the uninterrupted run: weights, optimizer state,
    every logged figure and skip count."""
    write_images(tmp_path)
    for i in range(7):
        Image.new("RGB", (8, 8), (30 * i, 90, 200 - 20 * i)).save(tmp_path / f"g{i}.png")
    bad = {2: "x.png", 5: "y.png", 8: "strip.png"}
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(
        {"prompt": f"pair {i}", "winner": "ok.png", "loser": bad.get(i, f"g{i % 7}.png")}) + "\n" for i in range(10)))
    sizes, stream = [], data.stream_batches

    def counted(*args, **kwargs):
        for e, item, batch in stream(*args, **kwargs):
            sizes.append(len(batch["prompt"]))
            yield e, item, batch

    monkeypatch.setattr(data, "stream_batches", counted)
    common = ["--data", str(tmp_path / "m.jsonl"), "--batch_size", "2", "--grad_accum", "2", "--resolution", "8",
              "--lr", "1e-3", "--max_steps", "5", "--no_progress", "--random_flip"]
    train.main(common + ["--out_dir", str(tmp_path / "straight"), "--save_every", "1", "--keep_checkpoints", "5"])
    assert sizes == [2] * 10  # 7 readable pairs an epoch: 3 batches (the 7th dropped at the end), never fewer pairs
    log = lambda out: [{k: v for k, v in json.loads(line).items() if k != "pairs_per_s"}
                       for line in open(tmp_path / out / "metrics.jsonl")]
    straight = log("straight")
    # each epoch meets its 3 unreadable pairs (2 corrupt images, 1 strip): epochs 0-2 read whole, the
    # 4th's first batch (its 2 pairs) met none
    assert straight[-1]["skipped"] == {"corrupt image": 2 * 3, "extreme aspect ratio": 3}
    positions = {k: json.load(open(tmp_path / "straight" / f"checkpoint-00000{k}" / "state.json"))["items_in_epoch"]
                 for k in (2, 3)}
    assert any(p % 2 for p in positions.values()), positions  # a position that counts a pair read past
    for k in (2, 3):
        out = tmp_path / f"from-{k}"
        shutil.copytree(tmp_path / "straight" / f"checkpoint-00000{k}", out / f"checkpoint-00000{k}")
        train.main(common + ["--out_dir", str(out), "--resume"])
        assert log(f"from-{k}") == straight[k:]
        for name in ("unet/diffusion_pytorch_model.safetensors", "optimizer.safetensors"):
            a, b = (load_file(tmp_path / d / "checkpoint-000005" / name) for d in ("straight", f"from-{k}"))
            assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a), (k, name)


# ---------------------------------------------------------------------------- 4. damaged caches

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "c"
    build_cache.build_cache("tiny", "toy", str(folder), num_items=6, dtype="fp32", shard_size=4, batch_size=2,
                     progress=False)  # shards of 4 and 2 pairs
    return folder


def damaged(built_cache, tmp_path, edit):
    folder = tmp_path / "c"
    shutil.copytree(built_cache, folder)
    edit(folder)
    return folder


def index_text(text):
    return lambda folder: (folder / "index.json").write_text(text)


def drop_key(key):
    def edit(folder):
        index = json.loads((folder / "index.json").read_text())
        del index[key]
        (folder / "index.json").write_text(json.dumps(index))
    return edit


def truncate(name, keep):
    def edit(folder):
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[:keep if keep >= 0 else len(raw) + keep])
    return edit


CASES = {
    "garbage": (index_text("{not json"), ValueError,
                "index.json: unreadable cache index (Expecting property name enclosed in double quotes: "
                "line 1 column 2 (char 1))"),
    "nested too deep": (index_text("[" * 100_000), ValueError,
                        "index.json: unreadable cache index (maximum recursion depth exceeded"),
    "list": (index_text("[]"), ValueError, "index.json: not a cache index (a JSON list, not an object)"),
    "empty object": (index_text("{}"), ValueError, "index.json: not a rpo-diffusion-cache/1 cache index (format None)"),
    "not utf-8": (lambda f: (f / "index.json").write_bytes(b'{"format": "\xff"}'), ValueError,
                  "index.json: unreadable cache index ("),
    "missing key": (drop_key("shards"), ValueError,
                    "index.json: cache index has no 'shards' (rebuild it with python -m tools.build_cache)"),
    "missing resolution": (drop_key("resolution"), ValueError, "index.json: cache index has no 'resolution'"),
    "bad shard entry": (index_text(json.dumps({"format": "rpo-diffusion-cache/1", "model": "tiny", "pretrained": None,
                                               "resolution": 16, "embed_model": "tiny", "flip": False,
                                               "vae_scale": 1.0, "num_pairs": 1, "skip_counts": {},
                                               "shards": [{"file": "s"}]})),
                        ValueError, "index.json: cache index shard entry {'file': 's'} is not"),
    "truncated shard": (truncate("shard-00001.safetensors", -7), ValueError,  # (safetensors words the cause)
                        "shard-00001.safetensors: unreadable cache shard, truncated or not safetensors (Error while "
                        "deserializing header: "),
    "shard cut in its header": (truncate("shard-00000.safetensors", 5), ValueError,
                                "shard-00000.safetensors: unreadable cache shard"),
    "missing shard": (lambda f: os.remove(f / "shard-00001.safetensors"), FileNotFoundError,
                      "shard-00001.safetensors: cache shard missing (listed in the index); rebuild the cache"),
    "missing empty": (lambda f: os.remove(f / "empty.safetensors"), FileNotFoundError,
                      "empty.safetensors: missing (the cache build did not finish); rebuild the cache"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_cache_is_one_line_naming_the_file(built_cache, tmp_path, case):
    edit, kind, words = CASES[case]
    folder = damaged(built_cache, tmp_path, edit)
    with pytest.raises(kind) as e:
        cache.CachedPairs(str(folder), "tiny")
    msg = str(e.value)
    assert words in msg and str(folder) in msg and "\n" not in msg, msg
    assert type(e.value) is kind  # not a KeyError / SafetensorError subclass leaking out


def test_shard_that_disagrees_with_the_index(built_cache, tmp_path):
    def edit(folder):
        index = json.loads((folder / "index.json").read_text())
        index["shards"][0]["num_pairs"] = 5
        (folder / "index.json").write_text(json.dumps(index))
    folder = damaged(built_cache, tmp_path, edit)
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors: \w+ has 4 rows, not 5; rebuild the cache"):
        cache.CachedPairs(str(folder), "tiny")


def test_parts_of_different_builds_refused(built_cache, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    index = json.loads((built_cache / "index.json").read_text())
    (folder / "index-000-of-002.json").write_text(json.dumps(index))
    (folder / "index-001-of-002.json").write_text(json.dumps({**index, "resolution": 32}))
    with pytest.raises(ValueError, match=r"index-001-of-002\.json: a part of another cache build than .*"
                                         r"index-000-of-002\.json \(settings differ\)"):
        cache.read_cache_index(str(folder))
    (folder / "index-001-of-002.json").write_text("[]")
    with pytest.raises(ValueError, match=r"index-001-of-002\.json: not a cache index \(a JSON list"):
        cache.read_cache_index(str(folder))


def test_train_turns_a_damaged_cache_into_error_line(built_cache, tmp_path):
    for i, edit in enumerate((index_text("[]"), truncate("shard-00001.safetensors", -7))):
        folder = damaged(built_cache, tmp_path / str(i), edit)
        with pytest.raises(SystemExit) as e:
            train.main(["--data", f"cache:{folder}", "--out_dir", str(tmp_path / "o"), "--no_progress"])
        assert str(e.value).startswith(f"error: {folder}") and "\n" not in str(e.value)


def test_intact_cache_still_reads(built_cache):
    ds = cache.CachedPairs(str(built_cache), "tiny")
    assert len(ds) == 6 and ds[5]["cache_latent_w"].shape == (3, 16, 16)
