"""
Reading what a user points at, safely: images that may be broken, text that may not be UTF-8,
file names from an index that may point outside its folder, download names from URLs. Each
problem is one line naming the file (SystemExit), never a traceback.
"""
import codecs
import hashlib
import io
import json
import os
import re

from PIL import Image

from plumbing import hub


def open_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # e.g. a truncated PNG
        raise SystemExit(f"error: {path}: not a readable image ({type(err).__name__}: {hub.first_line(err)})")

def read_utf8(path):
    """A text file's content (a UTF-8 BOM dropped). Anything else ends in one line naming the file,
    line and column of the first byte that is not UTF-8: guessing another encoding could turn a
    prompt into different text without a word."""
    with open(path, "rb") as f:
        raw = f.read()
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise SystemExit(f"error: {path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
                         f"save the file as UTF-8")

def path_inside(folder, name):
    """FOLDER/NAME if its real path (symlinks resolved) lies inside FOLDER's, else None: a
    samples.jsonl must not make us read (or show) files from elsewhere."""
    root = os.path.realpath(folder)
    try:
        path = os.path.realpath(os.path.join(root, name))
    except ValueError:  # a NUL byte in the name: no path at all
        return None
    return path if os.path.commonpath([root, path]) == root else None

def url_cache_path(url, cache_dir):
    """Where a download from URL is cached: CACHE_DIR/<hash>-<file name>. The name is sanitised
    (decoded, last component only, no leading dots, [A-Za-z0-9._+-]) so that no URL can choose a
    path outside CACHE_DIR; the hash of the whole URL keeps two URLs with one file name apart."""
    from urllib.parse import unquote, urlsplit
    name = os.path.basename(unquote(urlsplit(url).path).replace("\\", "/"))
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "download"
    return os.path.join(cache_dir, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")


def read_index(folder):
    """A sample.py output folder's samples.jsonl -> records (dicts with prompt, seed, file and
    path = the image's path). Every listed file must lie inside the folder and be an image (its
    header is read here, so a bad folder fails before any model loads)."""
    index = os.path.join(folder, "samples.jsonl")
    if not os.path.isfile(index):
        raise SystemExit(f"error: {folder}: no samples.jsonl (not a sample.py output folder?)")
    records = []
    for n, line in enumerate(io.StringIO(read_utf8(index), newline=None), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"error: {index}:{n}: not valid JSON")
        if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "seed", "file")):
            raise SystemExit(f"error: {index}:{n}: needs the keys prompt, seed and file")
        if not (isinstance(rec["prompt"], str) and isinstance(rec["file"], str) and rec["file"]
                and isinstance(rec["seed"], int) and not isinstance(rec["seed"], bool)):
            raise SystemExit(f"error: {index}:{n}: prompt and file must be text, seed an integer")
        rec["path"] = path_inside(folder, rec["file"])
        if rec["path"] is None:
            raise SystemExit(f"error: {index}:{n}: image path {rec['file']!r} points outside {folder}; "
                             f"evaluate.py reads only files inside the folder it is given")
        if not os.path.isfile(rec["path"]):
            raise SystemExit(f"error: {index}:{n}: image file {rec['path']} is missing")
        try:
            Image.open(rec["path"]).close()  # the header only: cheap, and catches a non-image
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise SystemExit(f"error: {index}:{n}: {rec['file']} is not an image ({hub.first_line(err)})")
        records.append(rec)
    if not records:
        raise SystemExit(f"error: {index} lists no samples")
    return records


def folder_problem(path, flag):
    """Why `path` cannot be (or become) a folder to write into, as one error line, or None: the
    one check that train.py's --out_dir and sample.py's --out make before anything loads."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"error: {flag} {path} is a file, not a folder"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"error: {flag} {path}: {parent} is a file, not a folder"
    return None
