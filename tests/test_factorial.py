"""toy/factorial.py: the plan of each arm's lr grid and the factorial's tables, on hand-made numbers."""
import pytest

from toy import factorial as X
from toy import frontier as F


def test_a_seed_grows_its_grid_until_it_brackets_the_matched_styles():
    grid = X.GRID["dpo"]  # 3.2e-7 .. 3.2e-6
    assert X.grown({}, grid) == grid  # nothing run yet: the starting grid
    styles = dict(zip(grid, (0.65, 0.7, 0.75, 0.78, 0.79)))  # already styled at its lowest, not at its highest
    assert X.grown(styles, grid) == [1.8e-7] + grid + [5.6e-6]
    styles.update({1.8e-7: 0.5, 5.6e-6: 0.9})
    assert X.grown(styles, grid) == [1.8e-7] + grid + [5.6e-6]  # bracketed: no more
    # another seed starts from seed 0's points and grows its own way: a slower seed upward
    start = grid[1:4]
    assert X.grown(dict(zip(start, (0.4, 0.55, 0.7))), start) == start + [grid[4]]


def test_other_seeds_run_seed_0s_points_across_the_transition():
    lrs = X.GRID["rpo outside"]  # 1.8e-6 .. 1.8e-5
    assert X.other_lrs({lrs[0]: 0.4}, lrs) is None  # seed 0 unfinished: nothing planned yet
    assert X.other_lrs(dict(zip(lrs, (0.4, 0.55, 0.7, 0.85, 0.95))), lrs) == lrs[1:4]  # last < 0.6 .. first > 0.8
    assert X.other_lrs(dict(zip(lrs, (0.62, 0.7, 0.75, 0.78, 0.79))), lrs) == lrs  # never crossed: all of them


def test_the_arms_are_the_three_objectives_times_the_two_t_samplings():
    assert len(X.ARMS) == 6 and all(X.ARMS[a][1]["timesteps"] in ("batch", "pair") for a in X.ARMS)
    assert X.ARMS["rpo inside t=pair"][0] == ["--loss", "rpo", "--tau", "0.5", "--rpo_weighting", "inside",
                                              "--timesteps", "pair"]
    assert all(F.spec(a) == X.ARMS[a] for a in X.ARMS)  # toy.frontier's run_job trains them
    assert not set(X.ARMS) & set(F.VARIANTS)  # (and the frontier's own study is left as it is)


def test_the_paired_differences_isolate_each_factor():
    rows = []
    for arm, shift in (("dpo t=pair", 0.0), ("dpo t=batch", 0.01), ("rpo outside t=pair", 0.02),
                       ("rpo outside t=batch", 0.05), ("rpo inside t=pair", 0.0), ("rpo inside t=batch", 0.0)):
        for seed in (0, 1):
            for lr, style, content in ((1e-6, 0.5, 0.3), (2e-6, 0.9, 0.1 + shift)):
                rows.append({"variant": arm, "style_name": "winter", "batch": 8, "seed": seed, "lr": lr,
                             "style": style, "content": content})
    text = X.analysis(rows)
    # content at 0.7 = 0.3 + (0.1 + shift - 0.3)/2 = 0.2 + shift/2
    assert "| weighting at t=batch: rpo outside − dpo | " in text
    line = next(l for l in text.splitlines() if l.startswith("| weighting at t=batch: rpo outside − dpo"))
    assert "+0.020 ± 0.000 (n=2)" in line  # (0.05 - 0.01)/2 at every target
    line = next(l for l in text.splitlines() if l.startswith("| t sampling, rpo outside: batch − pair"))
    assert "+0.015 ± 0.000 (n=2)" in line
    line = next(l for l in text.splitlines() if l.startswith("| both at once"))
    assert "+0.025 ± 0.000 (n=2)" in line
    assert X.lr_at(rows, "dpo t=pair", "winter") == {0: pytest.approx(10 ** (-6 + 0.301 * 0.5), rel=1e-3),
                                                     1: pytest.approx(10 ** (-6 + 0.301 * 0.5), rel=1e-3)}
