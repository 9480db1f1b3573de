"""docs/read-along.md runs: every `>>>` line of the tutorial is executed on the tiny preset and its
printed output compared (doctest), so the page cannot drift from the code."""
import doctest
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "read-along.md")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_read_along_runs_as_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = doctest.testfile(PAGE, module_relative=False, optionflags=FLAGS, report=True)
    assert result.attempted >= 40 and result.failed == 0, result


def test_a_wrong_output_in_the_page_fails(tmp_path):
    """The runner compares outputs: the page with one printed value changed does not pass."""
    text = open(PAGE, encoding="utf-8").read()
    assert "(0.6931, 0.6931)" in text
    bad = tmp_path / "bad.md"
    bad.write_text(text.replace("(0.6931, 0.6931)", "(0.5, 0.6931)", 1), encoding="utf-8")
    result = doctest.testfile(str(bad), module_relative=False, optionflags=FLAGS, report=False)
    assert result.failed == 1
