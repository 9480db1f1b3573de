"""
A torch checkpoint (.pt, .pth, .bin: a pickle) rewritten as .safetensors, which holds tensors and
nothing else and is read without running any code.

    python -m tools.to_safetensors HPS_v2.1_compressed.pt HPS_v2.1.safetensors
    python -m tools.to_safetensors old.pt new.safetensors --trust_pickle    # see below

The checkpoint is read with torch.load(weights_only=True), which builds tensors and plain
containers only and refuses anything else: the way this project reads every pickle. A file that
holds other objects (a training checkpoint's optimizer or argparse state, say) is refused with one
line; --trust_pickle then reads it with weights_only=False, i.e. unpickles it in full, which runs
whatever code the file names: pass it only for a file from a source you trust, once, and use the
.safetensors file from then on. A {'state_dict': ...} checkpoint (HPSv2's) is unwrapped
(--key names another entry, --key '' keeps the top level); entries that are not tensors are left
out and counted. The output is checked before anything is read: a file already there is replaced
only with --overwrite, and it is written whole or not at all (safetensors writes a temporary file
and renames it).
"""
import argparse
import os
import pickle
import sys

import torch
from safetensors.torch import save_file

from plumbing import files, hub


def convert(src, dst, key="state_dict", trust_pickle=False):
    """src's tensors (under `key` when src is a dict holding it) -> dst .safetensors. Returns
    (tensors written, entries left out)."""
    if not os.path.isfile(src):
        raise SystemExit(f"error: {src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:  # weights_only refused an object
        raise SystemExit(f"error: {src} holds more than tensors ({hub.first_line(err)}); if you trust its source, "
                         f"rerun with --trust_pickle (unpickles it in full, which can run code)")
    except Exception as err:  # not a torch checkpoint, cut short
        raise SystemExit(f"error: cannot read {src} ({type(err).__name__}: {hub.first_line(err)})")
    if key and isinstance(obj, dict) and key in obj:
        obj = obj[key]
    if not isinstance(obj, dict):
        raise SystemExit(f"error: {src} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise SystemExit(f"error: {src} has no tensors" + (f" under '{key}'" if key else "") +
                         "; pass --key for the entry that holds them")
    # safetensors stores no views: each tensor gets its own contiguous copy of its data
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, dst)
    except Exception as err:  # a full disk, a folder gone since the check (safetensors' own error type)
        raise SystemExit(f"error: cannot write {dst} ({type(err).__name__}: {hub.first_line(err)})")
    return len(tensors), len(obj) - len(tensors)


def main(argv=None):
    p = argparse.ArgumentParser(description="Rewrite a torch checkpoint (pickle) as .safetensors.")
    p.add_argument("src", help=".pt / .pth / .bin checkpoint")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--key", default="state_dict", help="the entry holding the tensors, if there ('' = the top level)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="unpickle in full (weights_only=False): runs code the file names; only for trusted files")
    p.add_argument("--overwrite", action="store_true", help="replace dst when it exists")
    args = p.parse_args(argv)
    if not args.dst.endswith(".safetensors"):
        raise SystemExit("error: the output file must end in .safetensors")
    problem = files.file_to_write_problem(args.dst, "dst")  # (before the checkpoint is read: it may be large)
    if not problem and os.path.lexists(args.dst) and not args.overwrite:
        problem = f"dst {args.dst} exists; pass --overwrite to replace it"
    if problem:
        raise SystemExit(f"error: {problem}")
    written, left = convert(args.src, args.dst, args.key, args.trust_pickle)
    left = f" ({left} entries that are not tensors left out)" if left else ""
    print(f"wrote {written} tensors to {args.dst}{left}", file=sys.stderr)


if __name__ == "__main__":
    main()
