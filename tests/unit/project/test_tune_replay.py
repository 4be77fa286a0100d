"""The figures of benchmarks/tune.py's goals: a search's best at a third of the grid's steps, and its steps until
it is within 1% of the grid's best, on hand-made traces and a hand-made landscape."""

import json
from pathlib import Path

import pytest

from tests.unit.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def replay():
    return load_benchmark("tune_replay")


# [(steps spent, best finished eval loss so far)] after each trial; the grid's best is 2.0, so within 1% is <= 2.02
TRACE = [(12, 2.5), (16, 2.5), (28, 2.1), (40, 2.03), (60, 2.03), (72, 2.01), (84, 2.0)]


def test_best_at_a_budget_counts_only_trials_finished_within_it(replay):
    assert replay.best_at(TRACE, 60) == 2.03
    assert replay.best_at(TRACE, 71) == 2.03  # the trial that ends at 72 crossed the budget
    assert replay.best_at(TRACE, 11) == float("inf")


def test_steps_to_within_is_the_first_trial_that_gets_there(replay):
    assert replay.steps_to(TRACE, 2.0 * 1.01) == 72
    assert replay.steps_to(TRACE, 1.9) is None


def test_figures_over_searches(replay):
    searches = [{"regret": 0.0, "within": True, "steps_to_within": 24},
                {"regret": 0.015, "within": False, "steps_to_within": 72},
                {"regret": 0.005, "within": True, "steps_to_within": None}]  # never: counts the grid's 180 steps
    figures = replay.budget_figures(searches, grid_steps=180)
    assert figures["within_at_budget"] == pytest.approx(0.6667)
    assert figures["at_best_at_budget"] == pytest.approx(0.3333)
    assert figures["median_regret_at_budget"] == 0.005
    assert figures["mean_regret_at_budget"] == pytest.approx(0.00667)
    assert figures["steps_to_within"] == {"median": 72, "p90": 180, "not_reached": 1}


def _landscape(replay, final: dict[tuple[float, int], float]):
    """A 5 x 3 grid of 12-step trials whose eval loss is the final value at every report."""
    values, intermediate = {}, {}
    for learning_rate in replay.LEARNING_RATES:
        for rank in replay.RANKS:
            key = json.dumps({"methods.lora.r": rank, "train.learning_rate": learning_rate}, sort_keys=True)
            values[key] = final.get((learning_rate, rank), 3.0)
            intermediate[key] = dict.fromkeys(range(2, 13, 2), values[key])
    return replay.Grid(values=values, intermediate=intermediate, steps=12 * len(values), best=min(values.values()))


def test_a_search_where_every_point_is_within_one_percent_gets_there_with_its_first_trial(replay):
    grid = _landscape(replay, {(3e-3, 4): 2.98})  # every other point is 3.0: 0.67% worse
    by_name = {strategy.name: strategy for strategy in replay.strategies()}
    found = replay.budget_replay(by_name["random"], 0, grid)
    assert found["steps_to_within"] == 12
    assert found["within"]
    assert found["regret"] in (0.0, pytest.approx(3.0 / 2.98 - 1))


def test_random_search_trains_every_trial_in_full_and_stops_at_the_budget(replay):
    grid = _landscape(replay, {(3e-3, 4): 2.0})  # only one point is within 1%
    by_name = {strategy.name: strategy for strategy in replay.strategies()}
    result = replay.replay(by_name["random"], 0, grid, stop=lambda spent, best: spent >= 60)
    assert [spent for spent, _ in result["trace"]] == [12, 24, 36, 48, 60]
    found = replay.budget_replay(by_name["random"], 0, grid)
    assert found["within"] == (found["steps_to_within"] is not None and found["steps_to_within"] <= 60)
    assert found["steps_to_within"] % 12 == 0


def test_budget_searches_cover_every_grid_of_a_family(replay):
    grid = _landscape(replay, {(3e-3, 4): 2.0})
    by_name = {strategy.name: strategy for strategy in replay.strategies()}
    figures = replay.budget_searches(by_name["random"], {"city": [grid], "synthetic": [grid, grid]},
                                     {"city": 3, "synthetic": 2})
    assert figures["city"]["searches"] == 3 and figures["synthetic"]["searches"] == 4
    assert "city within 1% at a third" in replay.budget_line("random", figures)


def test_each_grid_of_a_family_is_searched_with_its_own_seeds(replay, monkeypatch):
    grids = [_landscape(replay, {(3e-3, 4): 2.0}), _landscape(replay, {(1e-3, 8): 2.0})]
    seen = []
    monkeypatch.setattr(replay, "budget_replay", lambda strategy, seed, grid: seen.append(
        (grids.index(grid), seed)) or {"regret": 0.0, "within": True, "steps_to_within": 12})
    replay.budget_searches(replay.strategies()[0], {"synthetic": grids}, {"synthetic": 3})
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]


def test_the_replayed_tailor_search_is_tailors_default_and_median_the_previous_one(replay):
    from tailor.config import TuneConfig

    by_name = {strategy.name: strategy for strategy in replay.strategies()}
    assert replay.benchmark_config(by_name["tailor"], 0).tune.pruner == TuneConfig().pruner == "successive_halving"
    assert replay.benchmark_config(by_name["median"], 0).tune.pruner == "median"
    assert replay.benchmark_config(by_name["random"], 0).tune.pruner == "none"


def continuous_goal(*seeds: tuple[float, int, float, int], trials: int = 12) -> dict:
    """tune.goals' continuous verdict on a continuous_search result: per seed (tailor F1, tailor steps, random F1,
    random steps), each strategy having run `trials`."""
    runs = {str(k): {"tailor": {"best_token_f1": tf1, "steps": ts, "trials": trials},
                     "random": {"best_token_f1": rf1, "steps": rs, "trials": trials}}
            for k, (tf1, ts, rf1, rs) in enumerate(seeds)}
    regret = {"tailor": {"city": 0.0, "synthetic": 0.0}, "random": {"city": 0.01, "synthetic": 0.01}}
    results = {"within_1pct_at_third": {"tailor": {"city": 0.95, "synthetic": 0.95}}, "median_regret_at_third": regret,
               "continuous_search": {"quick": False, "status": "as far as it ran", "seeds": runs}}
    return load_benchmark("tune").goals(results)[
        "continuous_search.tailor_f1_at_least_random_in_2_of_3_seeds_with_fewer_steps"]


@pytest.mark.parametrize("seeds, met, value", [
    # a seed is won with a best F1 at least random's and fewer steps
    ([(0.77, 1003, 0.74, 1943), (0.70, 900, 0.69, 1800)], True, "2 of 2 (of 3; 1 still running)"),
    ([(0.77, 1003, 0.74, 1943), (0.70, 1900, 0.69, 1800), (0.60, 900, 0.65, 1800)], False, "1 of 3"),
    ([(0.77, 1003, 0.74, 1943), (0.60, 900, 0.65, 1800)], None, "1 of 2 (of 3; 1 still running)"),
    ([(0.50, 1003, 0.74, 1943), (0.60, 900, 0.65, 1800)], False, "0 of 2 (of 3; 1 still running)"),
])
def test_the_continuous_goal_is_decided_once_the_running_seeds_cannot_change_it(seeds, met, value):
    found = continuous_goal(*seeds)
    assert (found["met"], found["value"]) == (met, value)


def test_a_seed_whose_trials_did_not_all_run_is_not_compared():
    found = continuous_goal((0.77, 1003, 0.74, 1943), (0.70, 500, 0.69, 900), trials=6)
    assert (found["met"], found["value"]) == (None, "0 of 0 (of 3; 3 still running)")


def test_the_clairvoyant_bound_stops_every_trial_that_will_not_win_at_its_first_report(replay):
    grid = _landscape(replay, {(3e-3, 4): 2.0})  # one winner: 12 steps + 2 per stopped trial fit in a third (60)
    bounds = load_benchmark("tune").bound_figures({"city": [grid], "synthetic": [grid, grid]},
                                                  {"city": 2, "synthetic": 1})
    for sampler, bound in bounds.items():
        assert bound["city"]["within_at_budget"] == bound["synthetic"]["within_at_budget"] == 1.0, sampler
        assert bound["city"]["steps_to_within"]["p90"] <= 12 + 2 * 13 + 12
