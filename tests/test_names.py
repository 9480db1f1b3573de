"""Names that cannot rot: every project file name (`train.py`, `plumbing/cache.py`), every
`file.py:function` and every `module.function` (`loss.rpo_loss`, `plumbing.hub.load_unet`) named in
the README, docs/ and the code's own comments and docstrings exists. A rename that forgets one of
them fails here, so the read-along stays true."""
import ast
import glob
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("plumbing", "toy", "bench", "tools", "tests")
# Python files that are not this project's, named in the docs for comparison or context.
EXTERNAL = {"train_diffusion_dpo.py", "train_diffusion_dpo_sdxl.py", "rf.py", "setup.py", "bench.py",
            "conftest.py", "__init__.py", "pipeline_stable_diffusion_xl.py", "pipeline_stable_diffusion.py",
            "lora_conversion_utils.py", "utils.py", "simple_inference.py"}


def project_py():
    files = glob.glob(os.path.join(ROOT, "*.py")) + [f for d in FOLDERS for f in glob.glob(os.path.join(ROOT, d, "*.py"))]
    return sorted(os.path.relpath(f, ROOT) for f in files)


def prose(source):
    """A .py file's comments and string literals (docstrings, help texts): where it names things."""
    kinds = {tokenize.COMMENT, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", -1)}
    out = []
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type in kinds:  # an f-string's {expressions} are code, not prose
            f_string = t.type == tokenize.STRING and "f" in t.string[:t.string.index(t.string[-1])].lower()
            out.append(re.sub(r"\{[^{}]*\}", "", t.string) if f_string else t.string)
    return "\n".join(out)


def texts():
    """(where, text) for every README/docs page, and the prose of every project .py file."""
    paths = ["README.md"] + sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for p in paths:
        with open(os.path.join(ROOT, p), encoding="utf-8") as f:
            yield p, f.read()
    for p in project_py():
        if not p.startswith("tests/"):
            with open(os.path.join(ROOT, p), encoding="utf-8") as f:
                yield p, prose(f.read())


def module_names(path):
    """Top-level names a module defines (functions, classes, assignments, imports)."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def modules():
    """Dotted module name -> its file: loss, model, ..., plumbing.hub, toy (its __init__), toy.clip."""
    out = {}
    for f in project_py():
        name = f[:-3].replace("/", ".")
        out[name.removesuffix(".__init__")] = f
    return out


FILE_RE = re.compile(r"(?<![\w./-])((?:[a-z_]+/)?[a-z_][a-z0-9_]*\.py)\b(?::([A-Za-z_]\w*))?")
DOTTED_RE = re.compile(r"(?<![\w./-])((?:plumbing|toy|bench|tools)\.[a-z_]\w*|loss|model|data|train|sample|evaluate|toy)"
                       r"\.([A-Za-z_]\w*)\b")
NOT_ATTRIBUTES = {"py", "md", "json", "jsonl", "png", "txt", "safetensors", "sh", "tar"}  # file names, not attributes


def test_every_file_named_exists():
    files = set(project_py())
    bases = {os.path.basename(f) for f in files}
    missing = []
    for where, text in texts():
        for m in FILE_RE.finditer(text):
            name = m.group(1)
            if name in EXTERNAL or name.startswith("test_"):
                continue
            ok = name in files if "/" in name else name in bases
            if not ok:
                missing.append(f"{where}: {name}")
    assert not missing, "named but missing:\n" + "\n".join(sorted(set(missing)))


def test_every_file_function_named_exists():
    files = set(project_py())
    missing = []
    for where, text in texts():
        for m in FILE_RE.finditer(text):
            name, func = m.groups()
            if not func or name in EXTERNAL:
                continue
            path = name if name in files else next((f for f in files if os.path.basename(f) == name), None)
            if path is None or func not in module_names(path):
                missing.append(f"{where}: {name}:{func}")
    assert not missing, "named but missing:\n" + "\n".join(sorted(set(missing)))


def test_every_module_attribute_named_exists():
    mods = modules()
    defined = {}
    missing = []
    for where, text in texts():
        for m in DOTTED_RE.finditer(text):
            mod, attr = m.groups()
            if attr in NOT_ATTRIBUTES or f"{mod}.{attr}" in mods:  # a submodule (toy.clip, plumbing.hub)
                continue
            if mod not in mods:
                missing.append(f"{where}: {mod}.{attr} (no module {mod})")
                continue
            if mod not in defined:
                defined[mod] = module_names(mods[mod])
            if attr not in defined[mod]:
                missing.append(f"{where}: {mod}.{attr}")
    assert not missing, "named but missing:\n" + "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("bad", ["method.py", "toy_world.py", "model.apply_checkpointing", "plumbing/nothing.py:f"])
def test_the_checks_can_fail(bad, monkeypatch):
    """A stale name in a page makes the checks above fail."""
    real = list(texts())
    monkeypatch.setitem(globals(), "texts", lambda: iter(real + [("page.md", f"see `{bad}`")]))
    checks = (test_every_file_named_exists, test_every_file_function_named_exists,
              test_every_module_attribute_named_exists)
    failed = 0
    for check in checks:
        try:
            check()
        except AssertionError:
            failed += 1
    assert failed >= 1
