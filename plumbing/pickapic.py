"""
Preference pairs from parquet, at any size: a local folder of shards (ParquetPairs: streamed a row
group at a time, disjoint row groups per DDP rank, exact resume) or a hub data set streamed by the
datasets library (HubPairs: resume by skipping rows). A Schema says which columns hold the prompt,
the two images and the preference; the built-in ones (checked against the data sets' own cards and
code, see docs/data.md#hub-and-parquet-preference-data):

  pickapic                caption, jpg_0, jpg_1, label_0 (1: jpg_0 preferred, 0: jpg_1, 0.5: a tie)
  open-image-preferences  prompt, chosen, rejected (winner and loser; no label)
  hpdv2                   prompt, image (a list of two images), human_preference ([1, 0]: the first): the
                          rows of HPDv2's loading script, and what tools/hpdv2_to_parquet.py writes from
                          the published train.json / test.json and image archives

Images are encoded bytes, or datasets' Image struct {"bytes", "path"} as it lies in parquet. Text
in an image column is refused (a counted skip, "image is not bytes"), never opened as a path.
Ties are dropped and counted. data.build_dataset sends --data hf:ID|DIR[#SCHEMA] and the older
pickapic:ID|DIR (the pickapic schema) to open_pairs.
"""
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from plumbing.image_files import ImagePairs, read_image
from plumbing import hub

# train.py's data for sd15/sdxl when --data is not given: Apache-2.0, 7,459 community-voted pairs of
# FLUX.1-dev and SD3.5-large images (its card), five parquet shards of ~430 MB (since its upload of
# 2024-12-09; the first upload had two).
DEFAULT_HUB = "data-is-better-together/open-image-preferences-v1-binarized"
DEFAULT_DATA = f"hf:{DEFAULT_HUB}"
PICKAPIC_HUB = "yuvalkirstain/pickapic_v2"  # the paper's data; the hub answers 404 for it since 2025
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
_SHARD_NAME = re.compile(r"^([A-Za-z_]+)-\d+-of-\d+")  # the hub layout: data/train-00000-of-00645-<hash>.parquet


class Schema(NamedTuple):
    """Where a data set keeps a pair. images: two columns (first, second), or one column holding a
    list of the two. label: None when images are (winner, loser); else a number (1: the first
    preferred, 0: the second, 0.5: a tie) or a list of one number per image (the larger preferred,
    equal: a tie)."""
    name: str
    prompt: str
    images: tuple
    label: str = None
    hub_ids: tuple = ()  # ids that mean this schema

    @property
    def columns(self):
        return (self.prompt, *self.images) + ((self.label,) if self.label else ())

    @property
    def index_columns(self):  # the small ones, read for every row up front
        return (self.prompt,) + ((self.label,) if self.label else ())


SCHEMAS = {
    "pickapic": Schema("pickapic", "caption", ("jpg_0", "jpg_1"), "label_0",
                       (PICKAPIC_HUB, "yuvalkirstain/pickapic_v1", "pickapic-anonymous/pickapic_v1")),
    "open-image-preferences": Schema("open-image-preferences", "prompt", ("chosen", "rejected"), None, (DEFAULT_HUB,)),
    "hpdv2": Schema("hpdv2", "prompt", ("image",), "human_preference", ("ymhao/HPDv2",)),
}
# ids that stream. pickapic-anonymous/pickapic_v1 holds the parquet files of Pick-a-Pic v1 under the
# names (and content hashes) of yuvalkirstain/pickapic_v1: data/train-NNNNN-of-00387-<hash>.parquet, ...
STREAMS = {"open-image-preferences": DEFAULT_HUB, "pickapic": "pickapic-anonymous/pickapic_v1"}
GONE = {PICKAPIC_HUB}
HUB_NOTES = {  # said with any failure to stream these
    PICKAPIC_HUB: "Pick-a-Pic v2 is no longer on the hub",
    "ymhao/HPDv2": "it ships JSON annotations, tar archives of images and a loading script, which datasets 4 and "
                   "later do not run: convert it once with python -m tools.hpdv2_to_parquet and pass hf:DIR",
}
NO_PAIRS = {  # ids that stream but hold no preference labels
    "data-is-better-together/open-image-preferences-v1":
        f"its rows are unlabelled generations; the voted pairs are {DEFAULT_HUB}",
}
MAPPING_HELP = "#prompt=COL,winner=COL,loser=COL or #prompt=COL,images=COL_A+COL_B,label=COL"


def parse_schema(text):
    """A built-in schema's name, or a column mapping (MAPPING_HELP) -> Schema."""
    if text in SCHEMAS:
        return SCHEMAS[text]
    bad = ValueError(f"--data ...#{text}: expected a schema ({', '.join(SCHEMAS)}) or a column mapping {MAPPING_HELP}")
    fields = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not value or key in fields or key not in ("prompt", "winner", "loser", "images", "label"):
            raise bad
        fields[key] = value
    images = fields.get("images", "").split("+")
    named = [v for k, v in fields.items() if k != "images"] + [c for c in images if c]
    twice = next((c for c in named if named.count(c) > 1), None)
    if twice:  # (winner=a,loser=a would train on pairs of one image; prompt=label would read text as a label)
        raise ValueError(f"--data ...#{text}: column {twice} is named for two roles; each of prompt, the two images "
                         f"and the label needs its own column")
    if set(fields) == {"prompt", "winner", "loser"}:
        return Schema("custom", fields["prompt"], (fields["winner"], fields["loser"]))
    if set(fields) == {"prompt", "images", "label"} and len(images) in (1, 2) and all(images):
        return Schema("custom", fields["prompt"], tuple(images), fields["label"])
    raise bad


def schema_for_id(hub_id):
    return next((s for s in SCHEMAS.values() if hub_id.lower() in (i.lower() for i in s.hub_ids)), None)


def detect_schema(column_sets, where):
    """The built-in schema whose columns most files (or the first hub row) have."""
    fits = lambda s: sum(set(s.columns) <= set(names) for names in column_sets)
    best = max(SCHEMAS.values(), key=fits)  # the first of equals: SCHEMAS' order
    if not fits(best):
        names = list(column_sets[0]) if column_sets else []
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        known = "; ".join(f"{s.name}: {', '.join(s.columns)}" for s in SCHEMAS.values())
        raise ValueError(f"{where}: its columns ({shown}) fit no built-in schema ({known}); name them: {MAPPING_HELP}")
    return best


def _number(x):
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and x == x


def preference(schema, prompt, label=None):
    """(skip reason, None), or (None, w): w = 0 when the first image is preferred, 1 the second."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "missing_field", None
    if schema.label is None:  # (winner, loser) columns
        return None, 0
    if isinstance(label, (list, tuple, np.ndarray)):  # one number per image (HPDv2: [1, 0] or [0, 1])
        if len(label) != 2 or not all(_number(x) for x in label):
            return "bad_label", None
        return ("tie", None) if label[0] == label[1] else (None, 0 if label[0] > label[1] else 1)
    if not _number(label):  # None, NaN, text
        return "bad_label", None
    if label == 0.5:
        return "tie", None
    if label not in (0, 1):
        return "bad_label", None
    return None, 0 if label == 1 else 1


def pair_cells(schema, get, w):
    """[(column, cell) of the preferred image, of the other] from a row (get: column -> cell), or
    None when a list column does not hold exactly two images."""
    if len(schema.images) == 2:
        cells = [(c, get(c)) for c in schema.images]
    else:
        col, value = schema.images[0], get(schema.images[0])
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return None
        cells = [(f"{col}[{k}]", value[k]) for k in range(2)]
    return [cells[w], cells[1 - w]]


def image_bytes(cell):
    """The encoded image in one cell (bytes, or the "bytes" of datasets' Image struct), else None.
    A str is refused whatever it says: text is never opened as a path."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return bytes(cell) if isinstance(cell, (bytes, bytearray, memoryview)) else None


def _holds_bytes(t):
    """Whether an arrow type can hold encoded images: binary, {bytes: binary, ...}, or a list of these."""
    import pyarrow as pa
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_bytes(t.value_type)
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _holds_bytes(t.field(i).type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or \
        getattr(pa.types, "is_binary_view", lambda _: False)(t)


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: --data hf:DIR reads parquet with pyarrow (pip install pyarrow)")
    return pq


class _PreferencePairs(ImagePairs):
    def _skip(self, reason, n=1):
        self.skip_counts[reason] = self.skip_counts.get(reason, 0) + n

    def _pair_item(self, prompt, cells, where, i):
        """The training item, or a skip marker "reason: where column" (counted by train.py)."""
        if cells is None:
            return {"skip": f"not a pair: {where}", "index": i}
        images = []
        for col, cell in cells:
            raw = image_bytes(cell)
            if raw is None:
                return {"skip": f"image is not bytes: {where} {col}", "index": i}
            img, refused = read_image(raw, self.resolution)  # every PIL mode, within the pixel budget
            if img is None:
                return {"skip": f"{refused[0]}: {where} {col}", "index": i}
            images.append(img)
        return self.pair_item(prompt, images[0], images[1], i)


class ParquetPairs(_PreferencePairs):
    """Preference pairs from parquet shards in a local folder, at any size with flat memory.

    Construction reads only the small columns (prompt, label) of every row group, keeping per row
    group the numbers of its usable rows: ~4 bytes a pair, 4 MB for a million. Ties, empty prompts,
    bad labels, files that lack a column and files whose image columns hold text are counted skips
    there. Images are read when a batch needs them, one row group at a time (the last `window` + 1
    row groups stay cached: memory is a few row groups of image bytes, whatever the data size).
    schema: a Schema, or None to pick the built-in one that the files' columns fit.

    Order (epoch_batches): every epoch shuffles the row groups (seed, epoch) and deals them to
    the ranks round-robin, so ranks read disjoint row groups and no pair is seen twice in an
    epoch; each rank shuffles the rows within consecutive windows of `window` of its row
    groups. Every rank knows every rank's pair count from the index, so all stop the epoch at
    the same batch (a pair left over on the larger ranks waits for a later epoch): DDP's
    collectives never wait on a rank that ran out. A corrupt image shows up only when decoded:
    a skip marker, read past by data.stream_batches (the next readable pair takes its place) and
    counted by train.py, as for manifests."""

    def __init__(self, folder, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 window=4, schema=None):
        super().__init__(resolution, seed, random_crop, random_flip)
        pq = _import_pyarrow()
        files = sorted(Path(folder).rglob("*.parquet"))
        if any(_SHARD_NAME.match(f.name) for f in files):  # hub layout: keep one split
            files = [f for f in files if (m := _SHARD_NAME.match(f.name)) and m[1] == split]
        elif files and split != "train":  # (a folder without splits is read whole: the default split's)
            raise FileNotFoundError(f"--data_split {split}: the .parquet files under {folder} are not named for "
                                    f"splits (SPLIT-00000-of-00005.parquet); a folder without splits is read whole, "
                                    f"as --data_split train")
        if not files:
            raise FileNotFoundError(f"no {split}-*.parquet or other .parquet files under {folder}")
        self.files, self.window, self._open, self._cache = [str(f) for f in files], window, {}, {}
        metas = []
        for path in self.files:  # footers only
            try:
                metas.append(pq.read_metadata(path))
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                raise ValueError(f"{path}: not a readable parquet file ({hub.first_line(err)})")
        arrows = [m.schema.to_arrow_schema() for m in metas]
        self.schema = s = schema or detect_schema([a.names for a in arrows], folder)
        units, rows = [], []  # units: (file, row group); rows: that row group's usable row numbers
        for fi, (path, meta, arrow) in enumerate(zip(self.files, metas, arrows)):
            missing = [c for c in s.columns if c not in arrow.names]
            text = [c for c in s.images if c in arrow.names and not _holds_bytes(arrow.field(c).type)]
            if missing or text:
                self._skip("missing_column" if missing else "image is not bytes", meta.num_rows)
                why = (f"no column(s) {', '.join(missing)}" if missing else
                       f"column(s) {', '.join(f'{c} ({arrow.field(c).type})' for c in text)} hold no image bytes")
                print(f"warning: {path}: {why}; its {meta.num_rows} rows skipped", file=sys.stderr)
                continue
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=list(s.index_columns))
                prompts = t.column(s.prompt).to_pylist()
                labels = t.column(s.label).to_pylist() if s.label else [None] * len(prompts)
                ok = []
                for r, (prompt, label) in enumerate(zip(prompts, labels)):
                    reason, _ = preference(s, prompt, label)
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
            raise ValueError(f"{folder}: no usable preference pairs (schema {s.name}: {', '.join(s.columns)}; "
                             f"skipped: {self.skip_counts or 'empty'})")
        if self.skip_counts:
            print(f"{folder}: {len(self)} pairs in {len(units)} row groups of {len(files)} files ({s.name}); "
                  f"skipped {self.skip_counts}", file=sys.stderr)

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
            self._cache[u] = self._open[fi].read_row_group(rg, columns=list(self.schema.columns))
            while len(self._cache) > self.window + 1:  # dicts keep insertion order: drop the oldest
                self._cache.pop(next(iter(self._cache)))
        return self._cache[u]

    def _row(self, i):
        u = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = int(self.rows[u][i - self.starts[u]])
        t, s = self._row_group(u), self.schema
        prompt = t.column(s.prompt)[r].as_py()
        _, w = preference(s, prompt, t.column(s.label)[r].as_py() if s.label else None)
        fi, rg = self.units[u]
        return prompt, pair_cells(s, lambda c: t.column(c)[r].as_py(), w), f"{self.files[fi]} row group {rg} row {r}"

    def row(self, i):
        """Pair i undecoded: (prompt, [(column, image bytes) of the winner, of the loser], where it
        lives in the shards). A cell without image bytes comes out as b"" (it decodes to None)."""
        prompt, cells, where = self._row(i)
        return prompt, [(c, image_bytes(v) or b"") for c, v in cells or [("", None)] * 2], where

    def __getitem__(self, i):
        return self._pair_item(*self._row(i), i)


class HubPairs(_PreferencePairs):
    """Preference pairs streamed from the hub (or any data set `datasets` can stream) by the
    datasets library: nothing is downloaded up front. stream() yields items and skip markers
    forever, epoch after epoch (a shuffle buffer reseeded each epoch); under DDP each rank reads its
    own part (datasets.distributed.split_dataset_by_node). Epoch lengths are not known in advance,
    so a rank's epoch boundary can fall a few batches apart from another's; resuming skips the rows
    already read. Images are read undecoded (decode(False)): datasets never opens a path for us.
    For exact epochs and resumes, download the shards and use ParquetPairs (hf:DIR)."""

    def __init__(self, hub_id, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 shuffle_buffer=1000, schema=None, prefix="hf"):
        super().__init__(resolution, seed, random_crop, random_flip)
        if hub_id in NO_PAIRS:
            raise SystemExit(f"error: --data {prefix}:{hub_id}: {NO_PAIRS[hub_id]}")
        try:
            import datasets
        except ImportError:
            raise SystemExit(f"error: --data {prefix}:{hub_id} streams with the datasets library (pip install "
                             f"datasets), or download the parquet shards and pass --data {prefix}:/path/to/folder")
        if not hasattr(datasets.IterableDataset, "decode"):  # images must come undecoded (no path opened)
            raise SystemExit(f"error: --data {prefix}:{hub_id} needs datasets 3.6 or later (pip install -U datasets)")
        self.hub_id, self.split, self.shuffle_buffer = hub_id, split, shuffle_buffer
        why = hub.unreachable(hub_id)  # in seconds, before datasets' retries
        if why:
            raise SystemExit(unreachable(hub_id, ConnectionError(why), prefix, schema))
        try:
            ds = datasets.load_dataset(hub_id, split=split, streaming=True).decode(False)
            first = next(iter(ds), None)  # reaching the data is what can fail (no network, no such id)
        except Exception as err:
            raise SystemExit(unreachable(hub_id, err, prefix, schema))
        if first is None:
            raise SystemExit(f"error: data set '{hub_id}' has no rows in split '{split}'")
        try:
            self.schema = s = schema or schema_for_id(hub_id) or detect_schema([list(first)], f"data set '{hub_id}'")
        except ValueError as err:
            raise SystemExit(f"error: {err}")
        missing = [c for c in s.columns if c not in first]
        if missing:
            raise SystemExit(f"error: data set '{hub_id}' has no column(s) {', '.join(missing)} of the {s.name} schema "
                             f"(its columns: {', '.join(list(first)[:12])}); name them: {MAPPING_HELP}")
        self.ds = ds

    def __len__(self):  # unknown in advance; the log prints it, nothing sizes anything by it
        return 0

    def stream(self, epoch, rank=0, world=1, skip_rows=0):
        """(epoch, item or skip marker) pairs, endlessly, starting `skip_rows` rows into `epoch`."""
        from datasets.distributed import split_dataset_by_node
        s = self.schema
        ds = self.ds.select_columns(list(s.columns))
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        while True:
            ds.set_epoch(epoch)
            self.epoch = epoch
            for n, row in enumerate(ds):
                if n < skip_rows:  # resuming: these were read before (not ds.skip, which reorders a shuffled stream)
                    continue
                reason, w = preference(s, row[s.prompt], row[s.label] if s.label else None)
                if reason:
                    yield epoch, {"skip": reason, "index": n}
                    continue
                yield epoch, self._pair_item(row[s.prompt], pair_cells(s, row.get, w), f"{self.hub_id} row {n}", n)
            epoch, skip_rows = epoch + 1, 0


PickapicParquet, PickapicHub = ParquetPairs, HubPairs  # the names before hf: (pickapic: picks the schema)


def _not_found(err):
    text = f"{type(err).__name__} {err}"
    return "DatasetNotFound" in text or "RepositoryNotFound" in text or "doesn't exist" in text or " 404" in text


def unreachable(hub_id, err, prefix="hf", schema=None):
    """The one line for a data set that cannot be streamed: why, and what else there is."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    if "OfflineModeIsEnabled" in text or "offline" in text.lower():
        why = "no hub access: offline mode (HF_HUB_OFFLINE=1)"
    elif _not_found(err):
        why = "not on the hub: removed, private or misspelled"
    elif isinstance(err, (ConnectionError, TimeoutError)) or "connect" in text.lower():
        why = f"hub unreachable: {text}"
    else:
        why = text
    if hub_id in HUB_NOTES:
        why += f"; {HUB_NOTES[hub_id]}"
    others = [f"hf:{i} ({name}{', the default' if i == DEFAULT_HUB else ''})"
              for name, i in STREAMS.items() if i.lower() != hub_id.lower()]
    others.append("hf:DIR#hpdv2 (HPDv2 after python -m tools.hpdv2_to_parquet)")
    fetch, use = hub_id, prefix  # what to download for local shards
    if hub_id in GONE or _not_found(err):  # not that one: the same schema's data that exists, else the default
        known = schema or schema_for_id(hub_id)
        fetch = STREAMS.get(known.name) if known else None
        fetch, use = (fetch, prefix) if fetch else (DEFAULT_HUB, "hf")
    return (f"error: cannot stream the data set '{hub_id}' ({why}). Preference data on the hub: {', '.join(others)}. "
            f"Without hub access, local parquet shards: hf download --repo-type dataset {fetch} --local-dir "
            f"/path/to/folder (where the hub is reachable), then --data {use}:/path/to/folder")


def open_pairs(spec, resolution=512, seed=0, random_crop=False, random_flip=False, split="train", window=4,
               shuffle_buffer=1000):
    """--data hf:ID|DIR[#SCHEMA] (schema: a built-in name or a column mapping; default: the id's
    built-in, else the one the columns fit) or pickapic:ID|DIR (the pickapic schema) -> a folder's
    ParquetPairs, or a hub id's HubPairs."""
    prefix, _, rest = str(spec).partition(":")
    where, _, name = rest.partition("#")
    schema = parse_schema(name.strip()) if name.strip() else SCHEMAS["pickapic"] if prefix == "pickapic" else None
    folder = os.path.expanduser(where)
    if os.path.isdir(folder):
        return ParquetPairs(folder, resolution, seed, random_crop, random_flip, split, window, schema)
    if not where or where.startswith((".", "/", "~")) or where.count("/") > 1:  # a folder, not an org/name id
        raise FileNotFoundError(f"--data {spec}: no folder {where}" if where else f"--data {spec}: names no data")
    return HubPairs(where, resolution, seed, random_crop, random_flip, split, shuffle_buffer, schema, prefix)
