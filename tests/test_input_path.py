"""The input path (issue #29): DataLoader workers give the main process's batches (same order, same
crops and flips, epoch after epoch, and from a resumed position); batches bound for a GPU are
pinned and moved without blocking; --num_workers auto; the start line on a GPU; the encoders
see winners and losers in one call each."""
import json
import os

import numpy as np
import torch
from PIL import Image

import data
import model as M
import train
from bench import speed as bench
from plumbing import distributed as D
from plumbing import speed
from tools import build_cache


def manifest(folder, n=9):
    """n pairs of random images in several sizes: every pair is resized, and cropped where it is
    not square, so a crop or flip drawn for the wrong epoch changes the pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(n):
            w, h = [(40, 24), (24, 44), (36, 36)][i % 3]
            for side in ("w", "l"):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}{side}.png")
            f.write(json.dumps({"prompt": f"pair {i}", "winner": f"{i}w.png", "loser": f"{i}l.png"}) + "\n")
    return folder / "pairs.jsonl"


def old_stream_batches(dataset, batch_size, seed, epoch, item, rank=0, world=1):
    """stream_batches as it was before the worker path (a DataLoader per epoch, the epoch set on
    the dataset in the main process), map-style data only: the order and items to keep."""
    global_batch = batch_size * world
    while True:
        dataset.epoch = epoch
        if hasattr(dataset, "epoch_batches"):
            batches = dataset.epoch_batches(epoch, rank, world, batch_size)[item // global_batch:]
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
            starts = range(item, len(order) - global_batch + 1, global_batch)
            batches = [order[s + rank * batch_size:s + (rank + 1) * batch_size] for s in starts]
        for batch in torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate_pairs):
            item += global_batch
            yield epoch, item, batch
        epoch, item = epoch + 1, 0


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ea, ia, ba), (eb, ib, bb) in zip(a, b):
        assert (ea, ia) == (eb, ib)
        assert ba.keys() == bb.keys()
        for key in ba:
            if torch.is_tensor(ba[key]):
                assert torch.equal(ba[key], bb[key]), (ea, ia, key)
            else:
                assert ba[key] == bb[key], (ea, ia, key)


def datasets(tmp_path):
    pairs = manifest(tmp_path / "raw")
    yield "manifest", data.ManifestPairs(pairs, 16, seed=3, random_crop=True, random_flip=True)
    import pyarrow.parquet as pq
    folder = bench.fake_pickapic(str(tmp_path / "pickapic"), 24, size=48)
    shard = os.path.join(folder, "train-00000-of-00001.parquet")
    pq.write_table(pq.read_table(shard), shard, row_group_size=4)  # 6 row groups, dealt to the ranks
    yield "pickapic", data.build_dataset(f"pickapic:{folder}", 16, seed=3, random_crop=True, random_flip=True, window=2)
    build_cache.build_cache("tiny-sd", str(pairs), str(tmp_path / "cache"), flip=True, batch_size=4, progress=False)
    yield "cache", data.build_dataset(f"cache:{tmp_path / 'cache'}", None, seed=3, random_flip=True, model="tiny-sd")
    yield "toy", data.ToyPairs(num_items=10, resolution=16, seed=3)


def test_workers_give_the_main_process_batches(tmp_path):
    """Three epochs and more of batches of 2 pairs per rank from 2 workers equal those read on
    the main process, and those of the code before workers, for every kind of map-style data;
    from the start and from a resumed position, on one rank and as rank 1 of 2."""
    for name, ds in datasets(tmp_path):
        for epoch, item, rank, world in [(0, 0, 0, 1), (1, 2, 0, 1), (0, 0, 1, 2)]:
            n = 2 * len(ds) // (2 * world) + 1  # into a third epoch
            args = (2, 3, epoch, item, rank, world)
            main = take(data.stream_batches(ds, *args, num_workers=0), n)
            workers = take(data.stream_batches(ds, *args, num_workers=2), n)
            assert_same(workers, main)
            assert_same(main, take(old_stream_batches(ds, *args), n))
            assert len({e for e, _, _ in main}) >= 2, name  # the batches span an epoch's end
        if name in ("manifest", "pickapic", "cache"):  # the crops and flips really are the epoch's
            ds.epoch = 0
            first = {i: ds[i] for i in range(len(ds))}
            ds.epoch = 1
            key = "cache_latent_w" if name == "cache" else "winner"
            assert any(not torch.equal(first[i][key], ds[i][key]) for i in range(len(ds))), name


def test_batches_for_a_gpu_are_pinned_and_moved(monkeypatch):
    """device cuda: the DataLoader pins, and each pair goes through to_device as it comes (the batch
    is stacked on the device); the CPU: neither."""
    made, moved = [], []
    real_loader = torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        made.append(kwargs)
        return real_loader(*args, **dict(kwargs, pin_memory=False))  # (no GPU here to pin for)

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    monkeypatch.setattr(data, "to_device", lambda batch, device: moved.append(device) or batch)
    ds = data.ToyPairs(num_items=8, resolution=16)
    next(data.stream_batches(ds, 2, 0, 0, 0, device=torch.device("cuda")))
    assert made[-1]["pin_memory"] is True and moved == [torch.device("cuda")] * 2  # the batch's 2 pairs
    next(data.stream_batches(ds, 2, 0, 0, 0, device=torch.device("cpu")))
    next(data.stream_batches(ds, 2, 0, 0, 0))
    assert [k["pin_memory"] for k in made] == [True, False, False] and len(moved) == 2


def test_to_device_moves_images_and_cached_tensors_only():
    batch = data.collate_pairs([data.ToyPairs(num_items=4, resolution=16)[i] for i in range(2)])
    batch["cache_latent_w"] = torch.zeros(2, 4, 2, 2)
    out = data.to_device(batch, "meta")
    assert {k for k, v in out.items() if torch.is_tensor(v) and v.is_meta} == {"winner", "loser", "cache_latent_w"}
    assert out["crop_top_left"].device.type == "cpu" and out["index"].device.type == "cpu"
    assert out["prompt"] == batch["prompt"] and not batch["winner"].is_meta  # the input batch is left as it was


def test_num_workers_auto(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert speed.auto_workers() == speed.MAX_AUTO_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 cores for each of 8 processes
    assert speed.auto_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert speed.auto_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    args = train.parse_args([])
    assert args.num_workers == "auto"
    speed.device_defaults(args, "cpu", real=False)
    assert args.num_workers == 0  # the CPU: the main process reads, as before
    for flag in ("mixed_precision", "optimizer", "sdpa_backend", "compile", "gradient_checkpointing"):
        setattr(args, flag, "no" if flag == "mixed_precision" else "default" if flag == "sdpa_backend" else "none")
    args.optimizer, args.num_workers = "adamw", "auto"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        speed.device_defaults(args, "cuda", real=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        speed.set_sdpa_backend("default")
    assert args.num_workers == 2  # 3 cores, one of them the main process's
    assert train.parse_args(["--num_workers", "3"]).num_workers == 3


def test_start_line_about_the_input_path(tmp_path, monkeypatch, capsys):
    pairs = manifest(tmp_path / "raw", n=4)
    ds = data.ManifestPairs(pairs, 16)
    args = lambda *flags: train.parse_args(["--data", str(pairs), *flags])
    cuda = torch.device("cuda")
    assert speed.input_note(args("--num_workers", "0"), "cpu", ds) is None  # nothing new on the CPU
    assert speed.input_note(args("--num_workers", "0"), torch.device("cpu"), ds) is None
    slow = speed.input_note(args("--num_workers", "0"), cuda, ds)
    assert slow.startswith("input path: likely to hold the GPU back") and "--num_workers 0" in slow
    fine = speed.input_note(args("--num_workers", "3"), cuda, ds)
    assert fine.startswith("input path: 3 DataLoader workers") and "tools.build_cache" in fine
    from PIL import features
    monkeypatch.setattr(features, "check_feature", lambda name: False)
    assert "without libjpeg-turbo" in speed.input_note(args("--num_workers", "3"), cuda, ds)
    assert speed.input_note(train.parse_args(["--data", "toy", "--num_workers", "0"]), cuda, ds) is None
    assert speed.input_note(train.parse_args(["--data", "cache:x", "--num_workers", "2"]), cuda, ds) is None
    # train.py on the CPU: workers resolved to 0, and no input-path line
    train.main(["--data", str(pairs), "--batch_size", "2", "--max_steps", "1", "--out_dir", str(tmp_path / "run"),
                "--no_progress", "--resolution", "16"])
    assert "input path" not in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "args.json"))["num_workers"] == 0


def test_winners_and_losers_meet_each_encoder_once(tmp_path):
    """One micro-batch of B raw pairs (tiny-xl, RPO): the VAE encoder runs once on 2B images,
    each text encoder once on B prompts, E5's CLIP once on 2B images and once on B prompts."""
    m = M.load_models("tiny-xl")
    embedder = M.load_embedder("tiny")
    calls = []
    hook = lambda name: (lambda mod, inputs, kwargs, out: calls.append(
        (name, len((inputs or tuple(kwargs.values()))[0]))))
    modules = [("vae", m.vae.encoder), ("clip image", embedder[0].vision_model), ("clip text", embedder[0].text_model)]
    modules += [(f"text encoder {k}", te) for k, te in enumerate(m.text_encoders)]
    handles = [mod.register_forward_hook(hook(name), with_kwargs=True) for name, mod in modules]
    B = 3
    batch = data.collate_pairs([data.ToyPairs(num_items=8, resolution=32)[i] for i in range(B)])
    args = train.parse_args(["--model", "tiny-xl", "--loss", "rpo"])
    try:
        train.micro_batch_loss(m, batch, torch.Generator().manual_seed(0), args, D.Share(B), embedder=embedder)
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted([("vae", 2 * B), ("clip image", 2 * B), ("clip text", B),
                                    ("text encoder 0", B), ("text encoder 1", B)])
