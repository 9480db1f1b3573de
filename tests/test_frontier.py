"""frontier.py's analysis on hand-made numbers (the study itself takes hours: results/toy-study/)."""
import math

import pytest

import frontier as F


def test_content_at_interpolates_where_the_lr_path_first_crosses_the_style():
    pts = [(1e-6, 0.40, 0.30), (3e-7, 0.35, 0.32), (3e-6, 0.60, 0.20), (1e-5, 0.90, 0.05)]  # unsorted on purpose
    assert F.content_at(pts, 0.5) == pytest.approx(0.30 + (0.20 - 0.30) * (0.5 - 0.40) / (0.60 - 0.40))  # 0.25
    assert F.content_at(pts, 0.75) == pytest.approx(0.20 + (0.05 - 0.20) * 0.5)  # 0.125
    assert F.content_at(pts, 0.95) is None and F.content_at(pts, 0.2) is None  # never crossed


def test_mean_ci_is_a_t_interval_over_seeds():
    m, ci = F.mean_ci([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and ci == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert F.mean_ci([0.5]) == (0.5, None) and F.mean_ci([]) == (None, None)


def test_matched_pairs_rpo_and_dpo_by_seed():
    table = [{"variant": v, "batch": 8, "style_name": "winter", "seed": s, "lr": lr, "style": st, "content": c}
             for v, shift in (("dpo", 0.0), ("rpo τ=0.5", 0.05)) for s in (0, 1)
             for lr, st, c in ((1e-7, 0.4, 0.3), (1e-6, 0.8, 0.1 + shift))]
    assert F.matched(table, "dpo", 0.6) == {0: pytest.approx(0.2), 1: pytest.approx(0.2)}
    assert F.matched(table, "rpo τ=0.5", 0.6) == {0: pytest.approx(0.225), 1: pytest.approx(0.225)}
    assert "+0.025" in F.analysis(table)


def test_the_job_list_is_unique_and_puts_seed_0_first():
    jobs = F.jobs()
    assert len(jobs) == len(set(jobs)) == 196
    first_other = next(i for i, j in enumerate(jobs) if j[2] != 0)
    assert all(j[2] == 0 and j[3] == 8 and j[4] == "winter" for j in jobs[:first_other])
    assert {j[0] for j in jobs[:first_other]} == set(F.VARIANTS)
