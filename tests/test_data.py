"""Tests for data.py, plumbing/images.py (the toy world too): pair alignment (same crop/flip), manifest skipping,
toy determinism."""
import copy
import itertools
import json
import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ManifestPairs, ToyImages, ToyPairs, build_dataset  # noqa: E402
import data  # noqa: E402
from data import collate_pairs, stream_batches  # noqa: E402
from plumbing.images import image_to_tensor, tensor_to_uint8  # noqa: E402
from plumbing.images import BACKGROUNDS, COLOURS, SHAPES, apply_style, render_toy, toy_prompts  # noqa: E402


# ---------------------------------------------------------------------------- helpers

def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def gradient(h, w):
    """Every pixel distinct, so any wrong crop corner or missing flip changes the values."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([10 * x + 40 * y, 200 - 30 * x, 7 * y + 3 * x], axis=-1).astype(np.uint8)


def write_manifest(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def warnings_of(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


# ---------------------------------------------------------------------------- crop and flip

def test_identical_pair_gets_identical_crop_and_flip(tmp_path):
    # A 13x9 random image needs a resize (shorter side 9 -> 8) and has room to crop in x.
    img = np.random.default_rng(0).integers(0, 256, (9, 13, 3))
    save(tmp_path / "w.png", img)
    save(tmp_path / "l.png", img)
    m = write_manifest(tmp_path / "m.jsonl", [{"prompt": "p", "winner": "w.png",
                                               "loser": "l.png"}] * 6)
    corners = set()
    for seed in range(4):
        ds = ManifestPairs(m, resolution=8, seed=seed, random_crop=True, random_flip=True)
        for epoch in (0, 1):
            ds.epoch = epoch
            for i in range(len(ds)):
                it = ds[i]
                assert it["winner"].shape == (3, 8, 8) and it["winner"].dtype == torch.float32
                assert torch.equal(it["winner"], it["loser"])
                corners.add(it["crop_top_left"])
    assert len(corners) > 1  # the crop really is random, so the equality above means something


def test_hand_computed_crop_and_flip_of_gradient(tmp_path):
    # 6 wide x 4 high, resolution 4: no resize, the crop can start at left = 0, 1 or 2.
    src = gradient(4, 6)
    save(tmp_path / "w.png", src)
    save(tmp_path / "l.png", 255 - src)  # loser = inverted winner: crop/flip commute with it
    m = write_manifest(tmp_path / "m.jsonl", [{"prompt": "p", "winner": "w.png",
                                               "loser": "l.png"}] * 8)
    # Centre crop, no flip: left = (6 - 4) // 2 = 1.
    it = ManifestPairs(m, resolution=4)[0]
    assert it["crop_top_left"] == (0, 1)
    assert torch.equal(it["winner"], image_to_tensor(src[:, 1:5]))
    assert np.array_equal(tensor_to_uint8(it["winner"]), src[:, 1:5])
    # Random crop and flip: the output must be exactly the crop at the reported corner, flipped
    # or not, and the loser must be the same crop/flip of the inverted image.
    seen = set()
    for seed in range(6):
        ds = ManifestPairs(m, resolution=4, seed=seed, random_crop=True, random_flip=True)
        for i in range(len(ds)):
            it = ds[i]
            top, left = it["crop_top_left"]
            assert top == 0 and 0 <= left <= 2
            crop = src[:, left:left + 4]
            out = tensor_to_uint8(it["winner"])
            flipped = np.array_equal(out, crop[:, ::-1])
            assert flipped or np.array_equal(out, crop)
            expect_l = (255 - crop)[:, ::-1] if flipped else 255 - crop
            assert np.array_equal(tensor_to_uint8(it["loser"]), expect_l)
            seen.add((left, flipped))
    assert seen == {(l, f) for l in (0, 1, 2) for f in (False, True)}


def test_crop_depends_on_epoch_and_is_reproducible(tmp_path):
    save(tmp_path / "w.png", gradient(8, 40))
    m = write_manifest(tmp_path / "m.jsonl", [{"prompt": "p", "winner": "w.png",
                                               "loser": "w.png"}] * 8)
    a = ManifestPairs(m, resolution=8, seed=3, random_crop=True)
    b = ManifestPairs(m, resolution=8, seed=3, random_crop=True)
    ep0 = [a[i]["crop_top_left"] for i in range(8)]
    assert [b[i]["crop_top_left"] for i in reversed(range(8))] == ep0[::-1]  # order-free
    a.epoch = 1
    assert [a[i]["crop_top_left"] for i in range(8)] != ep0


def test_original_sizes_and_crop_corner_non_square(tmp_path):
    # Landscape winner 42x20 (w x h), loser of another size: both end up at the winner's
    # resized size 21x10 for resolution 10, centre crop left = (21 - 10) // 2 = 5 (floor).
    save(tmp_path / "w.png", gradient(20, 42))
    save(tmp_path / "l.png", gradient(60, 30))
    # Portrait winner 20x50 -> 10x25, centre crop top = (25 - 10) // 2 = 7.
    portrait = gradient(50, 20)
    save(tmp_path / "p.png", portrait)
    m = write_manifest(tmp_path / "m.jsonl", [
        {"prompt": "land", "winner": "w.png", "loser": "l.png"},
        {"prompt": "port", "winner": "p.png", "loser": "p.png"}])
    ds = ManifestPairs(m, resolution=10)
    it = ds[0]
    assert it["original_size_w"] == (20, 42) and it["original_size_l"] == (60, 30)
    assert it["crop_top_left"] == (0, 5)
    assert it["winner"].shape == it["loser"].shape == (3, 10, 10)
    it = ds[1]
    assert it["original_size_w"] == (50, 20) and it["crop_top_left"] == (7, 0)
    expect = Image.fromarray(portrait).resize((10, 25), Image.BICUBIC).crop((0, 7, 10, 17))
    assert torch.equal(it["winner"], image_to_tensor(expect))
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["original_size_w"].tolist() == [[20, 42], [50, 20]]
    assert batch["original_size_l"].tolist() == [[60, 30], [50, 20]]
    assert batch["crop_top_left"].tolist() == [[0, 5], [7, 0]]
    assert batch["crop_top_left"].dtype == torch.long and batch["index"].tolist() == [0, 1]


# ---------------------------------------------------------------------------- manifest skipping

def test_pickapic_ties_dropped_and_label_picks_winner(tmp_path, capsys):
    save(tmp_path / "red.png", solid(8, 8, (255, 0, 0)))
    save(tmp_path / "blue.png", solid(8, 8, (0, 0, 255)))
    rec = {"caption": "c", "image_0": "red.png", "image_1": "blue.png"}
    m = write_manifest(tmp_path / "manifest.jsonl", [
        {**rec, "label_0": 0.5}, {**rec, "label_0": 1}, {**rec, "label_0": 0.5},
        {**rec, "label_0": 0}, {**rec, "label_0": 0.7}, {**rec, "label_0": 0.5}])
    ds = ManifestPairs(m, resolution=8)
    assert ds.skip_counts == {"tie": 3, "bad_label": 1}
    assert len(ds) == 2
    red, blue = image_to_tensor(solid(8, 8, (255, 0, 0))), image_to_tensor(solid(8, 8, (0, 0, 255)))
    assert torch.equal(ds[0]["winner"], red) and torch.equal(ds[0]["loser"], blue)  # label_0 = 1
    assert torch.equal(ds[1]["winner"], blue) and torch.equal(ds[1]["loser"], red)  # label_0 = 0
    assert ds[1]["prompt"] == "c"
    warns = warnings_of(capsys)
    assert len(warns) == 2  # one line per reason, not per line
    assert any("skipped 3 lines" in w and "tie" in w and "manifest.jsonl:1" in w for w in warns)
    assert any("skipped 1 lines" in w and "manifest.jsonl:5 0.7" in w for w in warns)


def test_only_ties_is_value_error_naming_file(tmp_path):
    save(tmp_path / "a.png", solid(8, 8, (1, 2, 3)))
    rec = {"caption": "c", "image_0": "a.png", "image_1": "a.png", "label_0": 0.5}
    m = write_manifest(tmp_path / "ties.jsonl", [rec] * 3)
    with pytest.raises(ValueError, match=r"ties\.jsonl.*tie=3"):
        ManifestPairs(m)


def test_missing_images_bad_json_missing_fields_are_counted(tmp_path, capsys):
    save(tmp_path / "imgs" / "ok.png", solid(8, 8, (9, 9, 9)))
    good = {"prompt": "p", "winner": "imgs/ok.png", "loser": "imgs/ok.png"}
    m = write_manifest(tmp_path / "manifest.jsonl", [
        good,
        {"prompt": "p", "winner": "imgs/ok.png", "loser": "imgs/x.png"},    # line 2
        "{not json",                                                         # line 3
        {"prompt": "p", "winner": "imgs/gone.png", "loser": "imgs/ok.png"},  # line 4
        {"prompt": "p", "winner": "imgs/ok.png"},                            # line 5
        {"prompt": "", "winner": "imgs/ok.png", "loser": "imgs/ok.png"},     # line 6
        "[1, 2]",                                                            # line 7
        {"caption": "c", "image_0": "imgs/ok.png", "label_0": 1},            # line 8
        {**good, "winner": str(tmp_path / "imgs" / "ok.png")},               # absolute: kept
    ])
    ds = ManifestPairs(m, resolution=8)
    assert ds.skip_counts == {"missing_image": 2, "bad_json": 2, "missing_field": 3}
    assert len(ds) == 2
    warns = warnings_of(capsys)
    assert len(warns) == 3
    assert any("skipped 2 lines with a missing image file" in w
               and "manifest.jsonl:2 'imgs/x.png'" in w for w in warns)
    assert any("skipped 3 lines" in w and "manifest.jsonl:5" in w for w in warns)


def test_missing_manifest_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ManifestPairs(tmp_path / "nope.jsonl")


def test_corrupt_image_is_skip_marker_and_collate_drops_it(tmp_path):
    save(tmp_path / "ok.png", solid(8, 8, (200, 100, 0)))
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    m = write_manifest(tmp_path / "m.jsonl", [
        {"prompt": "good", "winner": "ok.png", "loser": "ok.png"},
        {"prompt": "bad", "winner": "ok.png", "loser": "x.png"}])
    ds = ManifestPairs(m, resolution=8)
    assert len(ds) == 2  # the file exists, so construction keeps it
    marker = ds[1]
    assert marker == {"skip": f"corrupt image: {tmp_path / 'x.png'}", "index": 1}
    batch = collate_pairs([ds[0], marker, ds[0]])
    assert batch["prompt"] == ["good", "good"] and batch["winner"].shape == (2, 3, 8, 8)
    assert batch["skipped"] == [marker["skip"]] and batch["index"].tolist() == [0, 0]
    empty = collate_pairs([marker])
    assert empty["winner"] is None and empty["loser"] is None
    assert empty["prompt"] == [] and empty["skipped"] == [marker["skip"]]


def unreadable_manifest(tmp_path, n, bad):
    """n pairs with prompts p0..p{n-1}; the pairs in `bad` have a loser that is not an image."""
    save(tmp_path / "ok.png", solid(8, 8, (200, 100, 0)))
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    return ManifestPairs(write_manifest(tmp_path / "m.jsonl", [
        {"prompt": f"p{i}", "winner": "ok.png", "loser": "x.png" if i in bad else "ok.png"} for i in range(n)]), 8)


def prompts_of(batches):
    return [(e, item, b["prompt"], b["skipped"]) for e, item, b in batches]


def test_unreadable_pairs_are_read_past_batches_stay_full_and_resume_exactly(tmp_path, capsys):
    """One process: every batch holds batch_size pairs, the next readable ones in the epoch's order;
    the pairs read past are counted in "skipped" and in the position, and a run resumed at any
    position reads on exactly as the uninterrupted one did."""
    ds = unreadable_manifest(tmp_path, 10, bad={2, 3, 7})
    got = list(itertools.islice(stream_batches(ds, 3, 0, 0, 0), 8))
    # 7 readable pairs an epoch: 2 batches of 3, the 7th dropped with the epoch's end
    assert all(len(b["prompt"]) == len(b["index"]) == 3 and b["winner"].shape[0] == 3 for _, _, b in got)
    assert [e for e, _, _ in got] == [0, 0, 1, 1, 2, 2, 3, 3]
    for e in range(4):
        used = [p for ep, _, b in got if ep == e for p in b["prompt"]]
        assert len(set(used)) == 6 and not {"p2", "p3", "p7"} & set(used)
    for (e0, i0, _), (e1, i1, b) in zip(got, got[1:]):
        if e1 == e0:  # the position counts every item read: the 3 pairs and those read past
            assert i1 - i0 == 3 + len(b["skipped"])
    skips = [r for _, _, b in got[:6] for r in b["skipped"]]  # epochs 0-2, read whole by got[6]
    assert skips == [] or set(skips) == {f"corrupt image: {tmp_path / 'x.png'}"}
    assert len([r for _, _, b in got[:7] for r in b["skipped"]]) >= 3 * 2
    assert sum(len(b["skipped"]) for _, _, b in got) <= 4 * 3
    for k, (e, item, _) in enumerate(got[:-1]):
        assert prompts_of(itertools.islice(stream_batches(ds, 3, 0, e, item), 8 - k - 1)) == prompts_of(got[k + 1:])
    capsys.readouterr()
    # nothing that could fill a batch: one line, not an endless loop
    for n, bad in ((4, {0, 1, 2, 3}), (4, {0, 1, 3})):
        with pytest.raises(SystemExit, match="fewer than 2 readable pairs in a whole epoch"):
            next(stream_batches(unreadable_manifest(tmp_path, n, bad), 2, 0, 0, 0))


def test_two_ranks_read_past_unreadable_pairs_together(tmp_path, monkeypatch):
    """Under torchrun (here 2 ranks as threads; distributed.all_ranks, an all_reduce MIN, made of a
    barrier): each rank's batches are full, every rank ends each micro-batch at one position (a
    global micro-batch's end), no pair is used twice in an epoch, and a position resumes exactly."""
    ds = unreadable_manifest(tmp_path, 16, bad={1, 5, 6, 11})
    barrier, flags = threading.Barrier(2), {}

    def all_ranks(flag, device):
        flags[threading.get_ident()] = bool(flag)
        barrier.wait()
        every = all(flags.values())
        barrier.wait()
        return every

    monkeypatch.setattr(data.D, "all_ranks", all_ranks)

    def both(epoch, item, n):
        out = {}
        run = lambda r: out.__setitem__(r, list(itertools.islice(
            stream_batches(copy.copy(ds), 2, 0, epoch, item, r, 2), n)))
        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out[0], out[1]

    r0, r1 = both(0, 0, 8)
    assert [(e, i) for e, i, _ in r0] == [(e, i) for e, i, _ in r1]  # one position on every rank
    assert all(i % 4 == 0 and len(b["prompt"]) == 2 for e, i, b in r0 + r1)
    steps = [i1 - i0 for (e0, i0, _), (e1, i1, _) in zip(r0, r0[1:]) if e0 == e1]
    assert 4 in steps and any(s > 4 for s in steps)  # some micro-batches read into the next one
    for e in {e for e, _, _ in r0}:
        used = [p for e_, _, b in r0 + r1 if e_ == e for p in b["prompt"]]
        assert len(used) == len(set(used)) and not {"p1", "p5", "p6", "p11"} & set(used)
    e, item, _ = r0[2]
    again = both(e, item, 5)
    assert prompts_of(again[0]) == prompts_of(r0[3:]) and prompts_of(again[1]) == prompts_of(r1[3:])


# ---------------------------------------------------------------------------- toy set

def test_prompt_splits():
    train, test, all_ = toy_prompts("train"), toy_prompts("test"), toy_prompts("all")
    assert (len(train), len(test), len(all_)) == (60, 12, 72)
    assert not set(train) & set(test) and set(train) | set(test) == set(all_)
    for split in (train, test):
        words = {w for p in split for w in p.split()}
        assert set(SHAPES) <= words and set(COLOURS) <= words and set(BACKGROUNDS) <= words
    assert toy_prompts("test") == test  # deterministic
    with pytest.raises(ValueError):
        toy_prompts("val")


def test_toy_pairs_deterministic_per_item():
    a, b = ToyPairs(num_items=50, seed=0), ToyPairs(num_items=50, seed=0)
    other = ToyPairs(num_items=50, seed=1)
    for i in (7, 0, 31):  # any access order: items don't share an RNG stream
        x, y = a[i], b[i]
        assert x["prompt"] == y["prompt"]
        assert torch.equal(x["winner"], y["winner"]) and torch.equal(x["loser"], y["loser"])
        assert not torch.equal(x["winner"], x["loser"])
        assert x["winner"].shape == (3, 16, 16) and x["winner"].dtype == torch.float32
        assert x["original_size_w"] == (16, 16) and x["crop_top_left"] == (0, 0)
        assert x["index"] == i
    assert any(not torch.equal(a[i]["loser"], other[i]["loser"]) for i in range(5))
    assert {a[i]["prompt"] for i in range(50)} <= set(toy_prompts("train"))
    assert {ToyPairs(50, split="test")[i]["prompt"] for i in range(50)} <= set(toy_prompts("test"))


def test_toy_images_styled_fraction_and_batch():
    ds = ToyImages(num_items=600, seed=0)
    styled = [ds[i]["styled"] for i in range(600)]
    assert 0.27 <= np.mean(styled) <= 0.39
    assert "loser" not in ds[0]
    assert torch.equal(ToyImages(600, seed=0)[5]["winner"], ds[5]["winner"])
    batch = collate_pairs([ds[i] for i in range(4)])
    assert batch["loser"] is None and batch["winner"].shape == (4, 3, 16, 16)
    assert batch["styled"].dtype == torch.bool and batch["styled"].tolist() == styled[:4]
    # An unstyled item is exactly the plain render of the same stream (same draws as ToyPairs).
    i = styled.index(False)
    assert torch.equal(ds[i]["winner"], ToyPairs(600, seed=0)[i]["loser"])


def test_render_shapes_recognisable_at_16():
    # Fill ratio of the shape's bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    ratios = {}
    for shape in SHAPES:
        img = render_toy(f"a red {shape} on a black background", 16, np.random.default_rng(0))
        cover = (img[..., 0].astype(float) - 15) / (220 - 15)
        ys, xs = np.nonzero(cover > 0.5)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        ratios[shape] = cover.sum() / box
    assert ratios["square"] > 0.9 and 0.65 < ratios["circle"] < 0.85
    assert 0.4 < ratios["triangle"] < 0.6
    with pytest.raises(ValueError, match="not a toy prompt"):
        render_toy("a pink circle on a black background", 16, np.random.default_rng(0))


def test_styles():
    img = render_toy("a red square on a gray background", 64, np.random.default_rng(0))
    winter = apply_style(img, "winter", np.random.default_rng(1)).astype(float)
    snow = (winter == 250).all(axis=-1).mean()
    assert 0.03 < snow < 0.07
    assert winter.mean() > img.mean() + 20                       # brighter
    bg = winter[(winter != 250).any(axis=-1)]
    assert bg[:, 2].mean() > bg[:, 0].mean() + 10                # blue cast
    sketch = apply_style(img, "sketch", np.random.default_rng(1)).astype(float)
    assert (sketch[..., 0] == sketch[..., 1]).all() and (sketch[..., 1] == sketch[..., 2]).all()
    flat = img.astype(int).sum(-1) == img[0, 0].astype(int).sum()  # background pixels
    edges = np.abs(np.diff(img[..., 0].astype(float), axis=1)).max() > 0
    assert edges and sketch[..., 0][flat].mean() > 200          # light paper
    assert sketch[..., 0].min() < 120                            # dark strokes at edges
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(img, "vangogh", np.random.default_rng(0))


# ---------------------------------------------------------------------------- entry point, helpers

def test_build_dataset_dispatch(tmp_path):
    assert isinstance(build_dataset("toy", 16, num_items=3), ToyPairs)
    base = build_dataset("toy-base", 8, style="sketch", style_fraction=1.0, num_items=3)
    assert isinstance(base, ToyImages) and base[0]["styled"]
    assert base[0]["winner"].shape == (3, 8, 8)
    save(tmp_path / "a.png", solid(8, 8, (1, 2, 3)))
    m = write_manifest(tmp_path / "m.jsonl", [{"prompt": "p", "winner": "a.png", "loser": "a.png"}])
    assert isinstance(build_dataset(str(m), 8), ManifestPairs)
    with pytest.raises(ValueError, match="toy-base"):
        build_dataset("pickapic", 16)


def test_image_tensor_roundtrip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    t = image_to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 5, 7) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(tensor_to_uint8(t), arr)
    assert np.array_equal(tensor_to_uint8(torch.stack([t, t]))[1], arr)
    clamped = tensor_to_uint8(torch.tensor([2.0, -2.0, 0.0]).view(3, 1, 1))  # samples overshoot
    assert clamped.tolist() == [[[255, 0, 128]]]


def test_clip_embeddings_follow_E5():
    import model as M
    from model import clip_embeddings
    from plumbing.images import CLIP_MEAN, CLIP_STD
    clip, tok = M.load_embedder("tiny")
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_mean = clip_embeddings(clip, tok, prompts, images, "mean")
    f_text = clip_embeddings(clip, tok, prompts, images, "text")
    f_image = clip_embeddings(clip, tok, prompts, images, "image")
    # independent computation of the image part through CLIPModel.forward's own projections
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = clip(input_ids=ids, pixel_values=((images + 1) / 2 - mean) / std)  # 16x16 already: no resize
    assert torch.allclose(f_text, torch.nn.functional.normalize(out.text_embeds, dim=-1), atol=1e-5)
    assert torch.allclose(f_image, torch.nn.functional.normalize(out.image_embeds, dim=-1), atol=1e-5)
    assert torch.allclose(f_mean, torch.nn.functional.normalize(f_text + f_image, dim=-1), atol=1e-6)
    assert torch.allclose(f_mean.norm(dim=-1), torch.ones(2))
    # [winners; losers] in one call (the text encoded once, repeated) = two separate calls
    both = clip_embeddings(clip, tok, prompts, torch.cat([images, images.flip(0)]), "mean")
    assert both.shape == (4, f_mean.shape[1])
    assert torch.allclose(both[:2], f_mean, atol=1e-5)
    assert torch.allclose(both[2:], clip_embeddings(clip, tok, prompts, images.flip(0), "mean"), atol=1e-5)
    with pytest.raises(ValueError):
        clip_embeddings(clip, tok, prompts, images, "audio")
