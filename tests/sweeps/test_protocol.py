"""The comparison protocol in plain numbers: grids and their extension, evaluation spacing, interpolation, statistics."""

from __future__ import annotations

import math

import pytest

from ray_s2p.sweeps.protocol import best_index, edge_side, eval_interval, extension, log_grid, passes_to_target
from ray_s2p.sweeps.report import speed_up
from ray_s2p.sweeps.stats import mean_std, paired_comparison


def test_log_grid_and_its_extension_keep_one_ratio():
    grid = log_grid(1e-4, 1.0, 4)  # cells of one decade each, midpoints at 10^-3.5 ... 10^-0.5
    assert grid == pytest.approx([10 ** -3.5, 10 ** -2.5, 10 ** -1.5, 10 ** -0.5])
    assert extension(grid, "upper") == pytest.approx([10 ** 0.5, 10 ** 1.5])
    assert extension(grid, "lower") == pytest.approx([10 ** -5.5, 10 ** -4.5])  # ascending, nearest last
    with pytest.raises(ValueError, match="two points"):
        extension([0.1], "upper")
    with pytest.raises(ValueError, match="0 < low < high"):
        log_grid(1.0, 1.0, 5)


def test_only_a_strict_best_on_an_edge_asks_for_an_extension():
    assert edge_side([0.5, 0.4, 0.3, 0.2, 0.1]) == "lower"
    assert edge_side([0.1, 0.2, 0.3, 0.4, 0.5]) == "upper"
    assert edge_side([0.1, 0.5, 0.3, 0.2, 0.1]) is None
    assert edge_side([0.5, 0.5, 0.5, 0.2, 0.1]) is None  # a tie with an interior point: the middle one wins
    assert best_index([0.5, 0.5, 0.5, 0.2, 0.1]) == 2  # the tied point nearest the middle of the grid
    assert edge_side([None, 0.2, 0.3, 0.4, 0.5]) == "upper"  # failed trials are never best
    assert edge_side([0.2, 0.3, 0.4, 0.5, None]) is None  # the step above the best failed: nothing to extend
    assert edge_side([3.0, 2.0, 1.0], mode="min") == "upper"  # losses: smaller is better
    assert best_index([None, float("nan")]) is None and edge_side([None, None]) is None


def test_eval_interval_is_common_to_every_optimizer_and_gives_enough_points():
    # passes per step 2 (two-point), 3 (STP, first-order), 4 (no sign trick), 8 (q = 4): lcm 24
    interval = eval_interval(40_000, [2, 3, 4, 8], 25)
    assert interval == 1584 and interval % 24 == 0 and 40_000 // interval == 25
    assert eval_interval(12_000, [2, 3], 25) == 480 and eval_interval(30_000, [2, 3], 25) == 1200
    assert eval_interval(100, [2, 3, 8], 25) == 24  # too small a budget: one interval of the lcm
    with pytest.raises(ValueError, match="budget"):
        eval_interval(0, [2], 25)


def test_passes_to_target_are_interpolated_between_the_evaluations_around_the_crossing():
    curve = [(0, 0.10), (1000, 0.40), (2000, 0.60), (3000, 0.90)]
    assert passes_to_target(curve, 0.5) == pytest.approx(1500.0)  # halfway from 0.40 to 0.60
    assert passes_to_target(curve, 0.85) == pytest.approx(2000 + 1000 * 0.25 / 0.30)
    assert passes_to_target(curve, 0.10) == 0.0  # reached at the start
    assert passes_to_target(curve, 0.95) is None
    assert passes_to_target([(0, 0.1), (500, None), (1000, 0.3)], 0.2) == pytest.approx(500.0)  # a missing point
    # the first crossing counts, not a later one after a dip
    assert passes_to_target([(0, 0.1), (100, 0.6), (200, 0.2), (300, 0.7)], 0.5) == pytest.approx(80.0)


def test_paired_statistics_match_textbook_values():
    vs2p = {0: 0.70, 1: 0.72, 2: 0.69, 3: 0.71, 4: 0.73}
    other = {0: 0.65, 1: 0.70, 2: 0.66, 3: 0.70, 4: 0.69}  # differences 0.05, 0.02, 0.03, 0.01, 0.04
    r = paired_comparison(vs2p, other)
    # mean 0.03, sd sqrt(0.00025): t = 0.03 / (0.0158114 / sqrt 5) = 4.2426 on 4 degrees of freedom, p = 0.01324
    assert (r.n, r.wins, r.ties, r.losses) == (5, 5, 0, 0) and r.mean_difference == pytest.approx(0.03)
    assert r.t_p == pytest.approx(0.013236, abs=2e-6)
    assert r.wilcoxon_p == pytest.approx(2 / 32)  # exact: all five signs positive, two-sided
    assert r.verdict("VS2P", "mezo") == "VS2P better"
    flipped = paired_comparison(other, vs2p)
    assert flipped.verdict("mezo", "VS2P") == "VS2P better" and flipped.losses == 5
    # a failed run leaves the pairing; one pair gives no test
    few = paired_comparison({0: 0.7, 1: None}, {0: 0.6, 1: 0.5, 2: 0.4})
    assert (few.n, few.t_p, few.wilcoxon_p) == (1, None, None) and few.verdict("a", "b") == "not significant"
    noisy = paired_comparison({0: 0.7, 1: 0.6, 2: 0.7}, {0: 0.6, 1: 0.7, 2: 0.65})
    assert noisy.verdict("a", "b") == "not significant" and (noisy.wins, noisy.losses) == (2, 1)
    mean, std = mean_std([0.70, 0.72, 0.69, 0.71, 0.73])
    assert mean == pytest.approx(0.71) and std == pytest.approx(math.sqrt(0.00025))


def test_speed_up_pairs_the_seeds_where_both_reached_the_target_and_tests_the_passes():
    # Low-rank Rotten Tomatoes, 65 %: VS2P's and MeZO's passes per seed (docs/benchmarks.md); seed 5 of the
    # other rule never reached the target and leaves the pairing.
    vs2p = {0: 12382.0, 1: 8979.0, 2: 5931.0, 3: 7800.0, 4: 11091.0, 5: 9000.0}
    mezo = {0: 29583.0, 1: 20880.0, 2: 17217.0, 3: 15831.0, 4: 11959.0, 5: None}
    text = speed_up(vs2p, mezo)
    assert text == "2.07x (5 seeds; VS2P sooner in 5, t p 0.0214, Wilcoxon p 0.0625)"
    assert speed_up(vs2p, {0: None}) == "n/a"
    assert speed_up(vs2p, {2: 11862.0}) == "2.00x (1 seed; VS2P sooner in 1, t p n/a, Wilcoxon p n/a)"
