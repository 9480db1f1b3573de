"""
Pick-a-Pic v2 (the paper's training data): its parquet shards in a local folder
(PickapicParquet, streamed a row group at a time, disjoint row groups per DDP rank), or the hub
(PickapicHub, through the datasets library's streaming mode). Fields: caption, jpg_0, jpg_1,
label_0 (1: image 0 preferred, 0: image 1, 0.5: a tie, dropped and counted).
"""
import glob
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from images import ImagePairs, decode_image

PICKAPIC_HUB = "yuvalkirstain/pickapic_v2"  # train.py's data for real presets when --data is not given
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")  # all others are ignored
_SHARD_NAME = re.compile(r"^([A-Za-z_]+)-\d+-of-\d+")  # the hub layout: data/train-00000-of-00645-<hash>.parquet


def pickapic_row(caption, label):
    """(skip_reason, winner_column) for one Pick-a-Pic row: label_0 = 1 means image 0 won,
    0 means image 1 won, 0.5 is a tie (dropped: no preference to learn)."""
    if not isinstance(caption, str) or not caption.strip():
        return "missing_field", None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label != label:  # None, NaN
        return "bad_label", None
    if label == 0.5:
        return "tie", None
    if label not in (0, 1):
        return "bad_label", None
    return None, "jpg_0" if label == 1 else "jpg_1"


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: --data pickapic:DIR reads parquet with pyarrow (pip install pyarrow)")
    return pq


class PickapicParquet(ImagePairs):
    """Pick-a-Pic v2 from its parquet shards in a local folder, at any size with flat memory.

    Construction reads only the small columns (caption, label_0) of every row group, keeping
    per row group the numbers of its usable rows: ~4 bytes a pair, 4 MB for the whole data set.
    Ties, empty captions, bad labels and files that lack a column are counted skips there.
    Images are read when a batch needs them, one row group at a time (the last `window` + 1
    row groups stay cached: memory is a few row groups of JPEG bytes, whatever the data size).

    Order (epoch_batches): every epoch shuffles the row groups (seed, epoch) and deals them to
    the ranks round-robin, so ranks read disjoint row groups and no pair is seen twice in an
    epoch; each rank shuffles the rows within consecutive windows of `window` of its row
    groups. Every rank knows every rank's pair count from the index, so all stop the epoch at
    the same batch (a pair left over on the larger ranks waits for a later epoch): DDP's
    collectives never wait on a rank that ran out. A corrupt JPEG shows up only when decoded:
    a skip marker, dropped by collate_pairs and counted by train.py, as for manifests."""

    def __init__(self, folder, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 window=4):
        super().__init__(resolution, seed, random_crop, random_flip)
        pq = _import_pyarrow()
        files = sorted(Path(folder).rglob("*.parquet"))
        if any(_SHARD_NAME.match(f.name) for f in files):  # hub layout: keep one split
            files = [f for f in files if (m := _SHARD_NAME.match(f.name)) and m[1] == split]
        if not files:
            raise FileNotFoundError(f"no {split}-*.parquet or other .parquet files under {folder}")
        self.files, self.window, self._open, self._cache = [str(f) for f in files], window, {}, {}
        units, rows = [], []  # units: (file, row group); rows: that row group's usable row numbers
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                raise ValueError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:120]})")
            missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                self._skip("missing_column", pf.metadata.num_rows)
                print(f"warning: {path}: no column(s) {', '.join(missing)}; its {pf.metadata.num_rows} rows skipped",
                      file=sys.stderr)
                continue
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["caption", "label_0"])
                ok = []
                for r, (caption, label) in enumerate(zip(t.column("caption").to_pylist(),
                                                         t.column("label_0").to_pylist())):
                    reason, _ = pickapic_row(caption, label)
                    if reason:
                        self._skip(reason)
                    else:
                        ok.append(r)
                if ok:
                    units.append((fi, rg))
                    rows.append(np.asarray(ok, dtype=np.int32))
        self.units, self.rows = units, rows
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        if not units:
            raise ValueError(f"{folder}: no usable preference pairs (skipped: {self.skip_counts or 'empty'})")
        if self.skip_counts:
            print(f"{folder}: {len(self)} pairs in {len(units)} row groups of {len(files)} files; "
                  f"skipped {self.skip_counts}", file=sys.stderr)

    def _skip(self, reason, n=1):
        self.skip_counts[reason] = self.skip_counts.get(reason, 0) + n

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):  # DataLoader workers: open files and cached row groups stay behind
        return {**self.__dict__, "_open": {}, "_cache": {}}

    def epoch_batches(self, epoch, rank, world, batch_size):
        """This rank's batches (lists of item indices) for one epoch; every rank gets as many."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        counts = [sum(len(self.rows[u]) for u in order[r::world]) for r in range(world)]
        n_batches = min(counts) // batch_size
        mine, items, n = order[rank::world], [], 0
        for w in range(0, len(mine), self.window):
            if n >= n_batches * batch_size:
                break
            group = mine[w:w + self.window]
            idx = np.concatenate([self.starts[u] + np.arange(len(self.rows[u])) for u in group])
            items.append(np.random.default_rng([self.seed, epoch, int(group[0])]).permutation(idx))
            n += len(idx)
        items = np.concatenate(items)[:n_batches * batch_size].tolist() if n_batches else []
        return [items[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]

    def _row_group(self, u):
        if u not in self._cache:
            fi, rg = self.units[u]
            if fi not in self._open:
                self._open[fi] = _import_pyarrow().ParquetFile(self.files[fi])
            self._cache[u] = self._open[fi].read_row_group(rg, columns=list(PICKAPIC_COLUMNS))
            while len(self._cache) > self.window + 1:  # dicts keep insertion order: drop the oldest
                self._cache.pop(next(iter(self._cache)))
        return self._cache[u]

    def row(self, i):
        """Pair i undecoded: (caption, [(column, JPEG bytes) of the winner, of the loser], where
        it lives in the shards)."""
        u = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = int(self.rows[u][i - self.starts[u]])
        t = self._row_group(u)
        caption, label = t.column("caption")[r].as_py(), t.column("label_0")[r].as_py()
        _, won = pickapic_row(caption, label)
        lost = "jpg_1" if won == "jpg_0" else "jpg_0"
        fi, rg = self.units[u]
        images = [(c, t.column(c)[r].as_py() or b"") for c in (won, lost)]
        return caption, images, f"{self.files[fi]} row group {rg} row {r}"

    def __getitem__(self, i):
        caption, images, where = self.row(i)
        win, los = (decode_image(jpg) for _, jpg in images)
        if win is None or los is None:
            return {"skip": f"corrupt image: {where} {images[0 if win is None else 1][0]}", "index": i}
        return self.pair_item(caption, win, los, i)


class PickapicHub(ImagePairs):
    """Pick-a-Pic v2 (or a data set of the same columns) streamed from the hub by the `datasets`
    library: nothing is downloaded up front. stream() yields items and skip markers forever,
    epoch after epoch (a shuffle buffer reseeded each epoch); under DDP each rank reads its own
    part (datasets.distributed.split_dataset_by_node). Epoch lengths are not known in advance,
    so a rank's epoch boundary can fall a few batches apart from another's; resuming skips the
    rows already read. For exact epochs and resumes, download the shards and use pickapic:DIR."""

    def __init__(self, hub_id, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 shuffle_buffer=1000):
        super().__init__(resolution, seed, random_crop, random_flip)
        try:
            import datasets
        except ImportError:
            raise SystemExit(f"error: --data pickapic:{hub_id} streams with the datasets library (pip install "
                             f"datasets), or download the parquet shards and pass --data pickapic:/path/to/folder")
        self.hub_id, self.split, self.shuffle_buffer = hub_id, split, shuffle_buffer
        try:
            self.ds = datasets.load_dataset(hub_id, split=split, streaming=True)
            first = next(iter(self.ds))  # reaching the data is what can fail (no network, no such id)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise SystemExit(f"error: cannot stream the data set '{hub_id}' ({reason}). Without hub access, download "
                             f"its parquet shards once (hf download --repo-type dataset {hub_id} "
                             f"--include 'data/{split}-*') and pass --data pickapic:/path/to/folder")
        missing = [c for c in PICKAPIC_COLUMNS if c not in first]
        if missing:
            raise SystemExit(f"error: data set '{hub_id}' has no column(s) {', '.join(missing)}")

    def __len__(self):  # unknown in advance; the log prints it, nothing sizes anything by it
        return 0

    def stream(self, epoch, rank=0, world=1, skip_rows=0):
        """(epoch, item or skip marker) pairs, endlessly, starting `skip_rows` rows into `epoch`."""
        from datasets.distributed import split_dataset_by_node
        ds = self.ds.select_columns(list(PICKAPIC_COLUMNS))
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        while True:
            ds.set_epoch(epoch)
            self.epoch = epoch
            for n, row in enumerate(ds):
                if n < skip_rows:  # resuming: these were read before (not ds.skip, which reorders a shuffled stream)
                    continue
                reason, won = pickapic_row(row["caption"], row["label_0"])
                if reason:
                    yield epoch, {"skip": reason, "index": n}
                    continue
                lost = "jpg_1" if won == "jpg_0" else "jpg_0"
                win, los = decode_image(row[won] or b""), decode_image(row[lost] or b"")
                if win is None or los is None:
                    yield epoch, {"skip": f"corrupt image: {self.hub_id} row {n}", "index": n}
                    continue
                yield epoch, self.pair_item(row["caption"], win, los, n)
            epoch, skip_rows = epoch + 1, 0
