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
import tempfile

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
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:  # a folder, no permission, a file gone since it was checked
        raise SystemExit(f"error: {path}: cannot be read ({err.strerror})")
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise SystemExit(f"error: {path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
                         f"save the file as UTF-8")
    if "\0" in text:  # valid UTF-8, but no text holds a NUL: UTF-16 without its BOM (every other byte 0), or binary
        at = text.index("\0")
        raise SystemExit(f"error: {path}:{text.count(chr(10), 0, at) + 1}: a NUL byte, which no text holds (UTF-16, "
                         f"or not a text file?); save the file as UTF-8")
    return text

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
    header is read here, so a bad folder fails before any model loads), each (prompt, seed) and
    each file listed once (twice would count one image twice, and pair it twice for win rates)."""
    index = os.path.join(folder, "samples.jsonl")
    if not os.path.isfile(index):
        raise SystemExit(f"error: {folder}: no samples.jsonl (not a sample.py output folder?)")
    records, seen = [], {}
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
        for key, what in (((rec["prompt"], rec["seed"]), "its (prompt, seed)"), (rec["path"], "its file")):
            if seen.setdefault(key, n) != n:
                raise SystemExit(f"error: {index}:{n}: {what} is listed on line {seen[key]} too: one image counted twice")
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
    one check that train.py's --out_dir and sample.py's --out make before anything loads. The
    nearest folder that exists (PATH or a parent) must be writable: PATH is created there."""
    if not path:
        return f"error: {flag} is empty: name a folder"
    if "\0" in path:
        return f"error: {flag} {path!r}: a path cannot hold a NUL byte"
    long_name = name_too_long(path)
    if long_name:
        return f"error: {flag} {shown(path)[:80]}...: {long_name}"
    control = next((c for c in path if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:  # (a newline, a tab, an escape: the one-line messages and the model card name it)
        return f"error: {flag} {path!r}: the name holds a control character ({control!r}); choose a plain name"
    odd = not_utf8(path)
    if odd is not None:  # (the folder's name goes into what is written there: args.json, the model card, logs)
        return (f"error: {flag} {shown(path)}: the name holds byte 0x{odd:02x}, which is not UTF-8 text; the files "
                f"written there name their folder: choose a name in UTF-8")
    if os.path.exists(path) and not os.path.isdir(path):
        return f"error: {flag} {path} is a file, not a folder"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        if os.path.lexists(parent):  # (a link to nothing, or a loop of links: no folder can be made there)
            return f"error: {flag} {path}: {parent} is a symbolic link that leads nowhere; remove it or choose another folder"
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"error: {flag} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"error: {flag} {path}: {parent} is not writable" +
                (" (a read-only file system)" if _read_only(parent) else "") + "; choose another folder")
    if parent != os.path.abspath(path):  # (os.access says yes to root almost anywhere, /proc and /sys too: try)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
        except OSError as err:
            return f"error: {flag} {path}: no folder can be made in {parent} ({err.strerror}); choose another folder"
    return None


def name_too_long(path):
    """Why PATH cannot be made (a name of more bytes than the file system takes, usually 255), or None."""
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > 255:
            return f"a name in it is {len(os.fsencode(part))} bytes long; file systems take at most 255"
    return None


def not_utf8(path):
    """The first byte of PATH's name that is not UTF-8 (Python holds it as a lone surrogate,
    U+DC80..U+DCFF, os.fsdecode's surrogateescape), or None."""
    return next((ord(c) - 0xDC00 for c in path if "\udc80" <= c <= "\udcff"), None)


def shown(path):
    """PATH as text that can always be printed and written: a byte that is not UTF-8 as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_only(folder):
    try:
        return bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except OSError:
        return False


# An argument that names a file rather than text: sample.py --prompts, train.py --validation_prompts
FILE_SUFFIXES = (".txt", ".tsv", ".json", ".jsonl", ".csv")


def looks_like_path(value):
    """Whether a value given where text or a file may go means a file: it exists, ends in a file
    suffix, or has a path separator and no blank (a prompt has blanks; "AC/DC at night" is text)."""
    seps = {os.sep, os.altsep or os.sep}
    return (os.path.lexists(value) or value.lower().endswith(FILE_SUFFIXES)
            or (any(c in value for c in seps) and not any(c.isspace() for c in value)))


def text_file_problem(value, flag, always=False):
    """For a value that looks like a path (looks_like_path), or any value with always=True: why it
    is not a readable file, as one line without the `error: ` prefix (for argparse's p.error), else
    None. Text that does not look like a path: None."""
    if "\0" in value:
        return f"{flag} {value!r}: a path cannot hold a NUL byte"
    if not (always or looks_like_path(value)):
        return None
    if os.path.isdir(value):
        return f"{flag} {value} is a folder, not a file"
    if not os.path.exists(value):
        return f"{flag} {value}: no such file" + (" (a broken symbolic link)" if os.path.lexists(value) else "")
    if not os.path.isfile(value):
        return f"{flag} {value} is not a regular file"
    if not os.access(value, os.R_OK):
        return f"{flag} {value}: the file is not readable"
    return None


def file_to_write_problem(path, flag):
    """Why PATH cannot be written as a file (one line without `error: `), or None: it is not a
    folder, and its folder exists and is writable."""
    if not path or "\0" in path:
        return f"{flag} {path!r}: not a file name"
    if name_too_long(path):
        return f"{flag} {shown(path)[:80]}...: {name_too_long(path)}"
    if os.path.isdir(path):
        return f"{flag} {path} is a folder, not a file"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{flag} {path}: no folder {parent}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: {parent} is not writable"
    return None


def rows_file_problem(path, flag):
    """A file the benchmarks append their JSON rows to: file_to_write_problem's, or, when it exists,
    anything but a file of such rows (one object a line, each with the "mode" or "model" every row
    has): the user's own file, which an appended row would spoil, or a pipe, which would block."""
    problem = file_to_write_problem(path, flag)
    if problem or not os.path.exists(path) or path == os.devnull:
        return problem
    foreign = f"{flag} {path} exists and is not a file of this benchmark's JSON rows: choose another name"
    if not os.path.isfile(path):
        return foreign
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line) if line.strip() else {"mode": ""}
                if not (isinstance(row, dict) and ("mode" in row or "model" in row)):
                    return foreign
    except (OSError, UnicodeDecodeError, ValueError):
        return foreign
    return None


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")  # what evaluate.py --curves writes (matplotlib picks by the name)


def earlier_result(path):
    """Whether the file PATH is an earlier result of evaluate.py, which a new one may replace: its
    JSON (an object with "runs") or a figure matplotlib drew (which names itself in the file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return False
    if b"matplotlib" in raw[:1 << 16].lower() or b"matplotlib" in raw[-(1 << 16):].lower():
        return True
    try:
        result = json.loads(raw)
    except ValueError:
        return False
    return isinstance(result, dict) and "runs" in result


def results_problem(out, figure=False, chart=False):
    """evaluate.py's --out (OUT: the one it writes): one error line, or None. A --curves figure
    (figure) is named for a format matplotlib writes; reward metrics' bar chart (chart: OUT with
    .png) must not be OUT itself; and a file already there that is not an earlier result of
    evaluate.py is the user's: never replaced."""
    problem = file_to_write_problem(out, "--out")
    if not problem and figure and not out.lower().endswith(FIGURE_SUFFIXES):
        problem = f"--out {out}: a figure is written as {', '.join(FIGURE_SUFFIXES)}: name it so"
    chart = os.path.splitext(out)[0] + ".png" if chart and not figure else None
    if not problem and chart == out:
        problem = f"--out {out}: the bar chart is written to the same name with .png: name the results .json"
    for path in (out, chart):
        if not problem and path and os.path.lexists(path) and not earlier_result(path):
            problem = (f"--out {out}" + (f": its bar chart {path}" if path != out else "") +
                       " exists and is not an earlier result of evaluate.py: choose another name")
    return problem and "error: " + problem


def write_atomic(path, text):
    """PATH's new content, whole or not at all: written to a fresh file beside it (never through a
    link left there), fsynced, then renamed over PATH. A PATH that is a symbolic link is replaced by
    the file, so nothing is ever written through a link to a file elsewhere."""
    tmp = f"{path}.part"
    if os.path.lexists(tmp):
        os.remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def link_out_of(path, root):
    """The target of PATH when PATH is a symbolic link that leads out of the folder ROOT, else None."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    root = os.path.realpath(root)
    return None if os.path.commonpath([root, target]) == root else target


def output_folder_problem(path, flag, marks, owned, overwrite=False, resuming=False, resume_flag=None, tolerated=(),
                          delete=True):
    """The rule train.py keeps for --out_dir, for every program that writes a folder (sample.py's
    --out, the tools' --out): it writes only into an empty folder or its own output, never beside
    or over a user's files. MARKS: names (fnmatch patterns) that make PATH this program's output;
    owned(): the paths of that output, which --overwrite deletes first (nothing else goes).
    resuming: the command continues that output (resume_flag: the flag that says so, for the
    message; None: the program cannot continue one). tolerated: names that are this program's but
    no earlier output (another process's part of the same build). delete=False: --overwrite is
    allowed but deletes nothing yet; the program calls again with delete=True once its other
    inputs have loaded, so a mistake in them never costs the earlier output. One error line, or
    None (PATH may be written)."""
    import fnmatch
    import shutil
    problem = folder_problem(path, flag)
    if problem or not os.path.isdir(path):
        return problem
    names = sorted(os.listdir(path))
    ours = [n for n in names if any(fnmatch.fnmatch(n, m) for m in marks)]
    foreign = [n for n in names if n not in ours and not any(fnmatch.fnmatch(n, m) for m in tolerated)]
    if foreign:
        return (f"error: {flag} {path} holds files that are not this program's output ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); it writes only into an empty folder or its own output: "
                f"choose another {flag}")
    if not ours or resuming:
        return None
    if overwrite and not delete:
        return None
    if overwrite:
        doomed = owned()
        for p in doomed:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)
        print(f"--overwrite: deleted the earlier output in {path} ({len(doomed)} files)")
        return None
    how = f"continue it with {resume_flag}, or " if resume_flag else ""
    return f"error: {flag} {path} holds an earlier output ({', '.join(ours[:2])}); {how}pass --overwrite to replace it"
