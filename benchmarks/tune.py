"""Hyperparameter search on the city example: how close does each search get for a third of a grid's training?

    python benchmarks/tune.py [--quick] [--results FILE]   → the replayed figures and goals (a few minutes)
    python benchmarks/tune.py --continuous [--quick]       → also the continuous search (hours; --quick: a smoke run)
    python benchmarks/tune.py --record-grid                → first train the grid again (about 20 minutes)
    python benchmarks/tune.py --rank-noise                 → also the grid's best ranks under other training seeds
    python benchmarks/tune.py --record-package-grid        → first train the grid on Privoxy's manuals (25 minutes)

The grid: learning rate × LoRA r (5 × 3 points, 12-step trials of the default model, an eval loss every 2 steps on
EVAL_RECORDS held-out answers), trained once with `tune.sampler=grid` and no pruning; its per-step eval losses are
recorded in benchmarks/results/tune.json (`grid`). Training is deterministic, so a search over the grid's points can
be replayed offline on those numbers (benchmarks/tune_replay.py: tailor's sampler, pruner and sampling code, each
trial's training replaced by the recorded losses), for many seeds, in seconds.

What is measured (the goals of issue 22), for four searches over the grid's points (categorical choices):

* `tailor`: bayesian search as tailor runs it with this benchmark's settings and tailor's defaults (TPE in
  UntriedFirst after STARTUP_TRIALS random trials; successive halving, its first rung at the first report);
* `random`: Optuna's RandomSampler (`tune.sampler=random`), no pruning;
* `random_pruned`: the same with tailor's default pruner;
* `median`: tailor's search with its previous default pruner (median, warm-up a third of a trial);

on three families: `city` (the recorded grid, seeds 0 … 199), `privoxy` (`package_grid`: the same grid trained on
Privoxy's manuals, documents no one here wrote, with pairs `tailor data synth` wrote from them; seeds 0 … 199) and
`synthetic` (100 seeded landscapes of the same shape, 10 seeds each; the family is described in
benchmarks/tune_replay.py). Issue 22's goals name `city` and `synthetic`:

* `within_1pct_at_third.<strategy>.<family>`: the share of searches whose best finished eval loss, once they have
  spent a third of the grid's training steps (pruned trials count the steps they ran), is within 1% of the grid's
  best; `median_regret_at_third`: the median of best / grid's best - 1 at that budget;
* `steps_to_within_1pct`: the steps until a search's best is within 1% of the grid's best, median and p90;
* `bound_clairvoyant_pruner.<sampler>`: the same figures for bounds, not searches: tailor's sampler (and random
  search's) with a pruner that knows every point's final value and stops at the first report every trial that will
  not beat the best so far: what a pruner that always answers its question right gives with those proposals (a
  real pruner can do better at a budget by luck: stopping a trial that would have improved a little saves its steps).

The retired goal (the grid's exact best with at most a third of its steps) asked for a rank the city grid decides by
noise: its three ranks at the best learning rate end within 0.018 of each other; its last figures are kept in
tune.json under `retired_goal`.

`--continuous`: a search on the real objective (held-out token F1 of the whole eval set) over a continuous space
(learning rate log-uniform, LoRA r and alpha, epochs), 12 trials each of `tailor` and `random`, tune seeds 0, 1, 2,
through `tailor.tune.run_tune` (the product's code: each trial trains and is evaluated); best F1 and the training
steps each used (`continuous_search`). Its studies are kept in `runs/benchmark-tune/continuous/` (SQLite, resumed by
a rerun); `--continuous-seeds N` runs the first N seeds only (an hour or more each on a 2-core CPU), and a later run
with more seeds resumes the finished ones from their studies. `--continuous-strategy S` and `--continuous-seed K`
train only those studies, so that one process per study can share the machine. With `--quick` it is a smoke run
(CONTINUOUS_QUICK: 2 trials per strategy, 1 seed, 2-step trials, 8 questions) that shows the path works and measures
nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tailor.config import apply_overrides, load_raw, validate_config  # noqa: E402
from tailor.tune import run_tune  # noqa: E402
from tailor.workspace import read_json, read_jsonl, write_json, write_jsonl  # noqa: E402

EXAMPLE = ROOT / "examples" / "city-services"
RESULTS = ROOT / "benchmarks" / "results" / "tune.json"
CACHE = ROOT / "runs" / "benchmark-tune"  # runs/ is not versioned
EVAL_RECORDS = 8  # held-out questions for the eval loss; the pruner reads it every 2 steps of every trial
STEPS, REPORT_EVERY, STARTUP_TRIALS = 12, 2, 2


def settings(pruner: str | None = None) -> tuple[list[str], dict]:
    """The grid benchmark's config overrides and space; `pruner` replaces tailor's default pruner."""
    learning_rates, ranks, steps = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [4, 8, 16], STEPS
    # eval.limit=0: the objective is the eval loss on the same questions the pruner's losses come from
    overrides = [f"train.max_steps={steps}", "train.batch_size=2", "train.warmup_ratio=0.0", "train.epochs=1",
                 "train.save_every=0", "eval.limit=0", "eval.max_new_tokens=4", "eval.batch_size=4",
                 "tune.metric=eval_loss", f"tune.report_every={REPORT_EVERY}",
                 f"tune.startup_trials={STARTUP_TRIALS}",
                 "tune.pruner_warmup_steps=null",  # the engine's default (successive halving: the first report)
                 *([f"tune.pruner={pruner}"] if pruner else [])]
    space = {"train.learning_rate": {"type": "categorical", "choices": learning_rates},
             "methods.lora.r": {"type": "categorical", "choices": ranks}}
    return overrides, space


def prepare_run(run_dir: Path, config, root: Path, eval_records: int | None = EVAL_RECORDS) -> None:
    """RUN/data from the example's Q/A files; the eval file cut to `eval_records` (None: all) so each eval is
    cheap."""
    from tailor.data.build import build_chat_data

    if (run_dir / "data" / "eval.jsonl").is_file():
        return
    build_chat_data(config, root, run_dir)
    if eval_records is not None:
        records = [record for _, record in read_jsonl(run_dir / "data" / "eval.jsonl")][:eval_records]
        write_jsonl(run_dir / "data" / "eval.jsonl", records)


def search(data: dict, run_dir: Path, sampler: str, trials: int, seed: int, pruner: str | None = None,
           example: Path = EXAMPLE):
    overrides = [f"tune.sampler={sampler}", f"tune.trials={trials}", f"tune.seed={seed}"]
    tuned = apply_overrides(data, overrides + ([f"tune.pruner={pruner}"] if pruner else []))
    return run_tune(validate_config(tuned), tuned, example, run_dir, source=f"benchmark ({sampler})")


def trial_steps(study) -> int:
    return sum(int(trial.user_attrs.get("steps", 0)) for trial in study.trials)


def grid_points(space: dict) -> int:
    return math.prod(len(dimension["choices"]) for dimension in space.values())


def train_grid(space: dict, run_dir: Path, extra: tuple[str, ...] = (), example: Path = EXAMPLE):
    """Every point of `space` trained in full with the grid benchmark's settings (and `extra` overrides) on
    `example`, in `run_dir` (a finished study is read, not trained again)."""
    overrides, _ = settings()
    data = apply_overrides(load_raw(example / "tailor.yaml"), [*overrides, *extra])
    data.setdefault("tune", {})["space"] = space
    prepare_run(run_dir, validate_config(data, "benchmark"), example)
    return search(data, run_dir, "grid", grid_points(space), 0, pruner="none", example=example)


# Privoxy's manuals (Debian's privoxy package): documents no one here wrote. They come with held-out questions but no
# training pairs, so the grid trains on pairs `tailor data synth` writes from them with the default model, as a user
# with documents only would; SYNTH_CHUNKS as in benchmarks/grounded.py's documents-only run.
PACKAGE_DOMAIN, PACKAGE_EXAMPLE, SYNTH_CHUNKS = "privoxy", ROOT / "examples" / "privoxy-docs", 120


def synthesized_pairs(example: Path, run_dir: Path) -> Path:
    """Training pairs synthesized from `example`'s documents (kept in run_dir; delete it to write them again)."""
    from tailor.config import load_config
    from tailor.data.ingest import ingest
    from tailor.data.synth import open_teacher, synthesize

    pairs = run_dir / "synth.jsonl"
    if pairs.is_file():
        return pairs
    config, root = load_config(example)
    corpus = run_dir / "corpus.jsonl"
    ingest([str(root / source) for source in config.sources], corpus, config.ingest, progress=False)
    teacher = open_teacher(config.base_model, root=root, dtype=config.train.dtype)
    try:
        synth = synthesize(corpus, teacher, max_chunks=SYNTH_CHUNKS, seed=config.data.seed)
    finally:
        teacher.close()
    write_jsonl(pairs, synth.kept)
    print(f"synth: {len(synth.kept)} pairs from {SYNTH_CHUNKS} chunks of {example.name}", flush=True)
    return pairs


def record_grid(cache: Path, domain: str = "city") -> dict:
    """Train the grid on `domain` (cached in `cache`; delete it to train again) and return its recorded eval
    losses. `privoxy`: the package domain, on synthesized pairs, LoRA with the city's settings."""
    _, space = settings()
    started = time.perf_counter()
    provenance = {}
    if domain == "city":
        grid = train_grid(space, cache / "full" / "grid")
    else:
        run_dir = cache / "privoxy" / "grid"
        run_dir.mkdir(parents=True, exist_ok=True)
        pairs = synthesized_pairs(PACKAGE_EXAMPLE, run_dir)
        # the answerable held-out questions only: the eval loss of an abstention says little about a search
        extra = (f"data.qa_files=[{pairs}]", "data.eval_files=[qa/eval.jsonl]", "train.method=lora",
                 "methods.lora.alpha=32", "methods.lora.dropout=0.0")
        grid = train_grid(space, run_dir, extra, PACKAGE_EXAMPLE)
        provenance = {"data": {"example": f"examples/{PACKAGE_EXAMPLE.name}", "synth_chunks": SYNTH_CHUNKS,
                         "train_pairs": len(read_jsonl(pairs)), "eval_records": EVAL_RECORDS,
                         "note": "train: pairs `tailor data synth` wrote from the manuals with the default model; "
                                 "eval: the first EVAL_RECORDS hand-written held-out questions (qa/eval.jsonl)"}}
    grid_size = grid_points(space)
    print(f"grid: {grid_size} trials, {trial_steps(grid.study)} steps, best eval loss {grid.best_value:.4f} "
          f"({grid.best_values})", flush=True)
    return {**provenance, "trials": grid_size, "steps": trial_steps(grid.study), "best_value": grid.best_value,
            "best": grid.best_values, "seconds": round(time.perf_counter() - started, 1),
            "values": {json.dumps(t.params, sort_keys=True): t.value for t in grid.study.trials},
            "intermediate": {json.dumps(t.params, sort_keys=True): {str(k): v for k, v in
                                                                     sorted(t.intermediate_values.items())}
                             for t in grid.study.trials}}


OTHER_TRAIN_SEEDS = (1, 2)


def rank_noise(cache: Path, grid: dict) -> dict:
    """The grid's LoRA ranks at its best learning rate, trained again with other training seeds (`train.seed`:
    initialization and shuffling), and with the grid's own as a check that training reproduces the grid: which
    rank is best there is what the city grid's median regret turns on."""
    _, space = settings()
    best_lr = grid["best"]["train.learning_rate"]
    space = {"train.learning_rate": {"type": "categorical", "choices": [best_lr]},
             "methods.lora.r": space["methods.lora.r"]}
    grid_seed = validate_config(load_raw(EXAMPLE / "tailor.yaml"), "benchmark").train.seed
    per_seed = {}
    for seed in (grid_seed, *OTHER_TRAIN_SEEDS):
        found = train_grid(space, cache / "rank-noise" / f"seed{seed}", (f"train.seed={seed}",))
        losses = {str(t.params["methods.lora.r"]): round(t.value, 4) for t in found.study.trials}
        per_seed[str(seed)] = {"eval_loss_by_r": losses, "best_r": int(min(losses, key=losses.get)),
                               "spread": round(max(losses.values()) / min(losses.values()) - 1, 5)}
        print(f"rank noise, train.seed {seed}: {per_seed[str(seed)]}", flush=True)
    return {"learning_rate": best_lr, "grid_train_seed": grid_seed, "seeds": per_seed,
            "note": f"eval loss of each LoRA r at the grid's best learning rate, per training seed (the grid's own: "
                    f"{grid_seed}); best_r: the lowest there; spread: worst / best - 1"}


# ---- the replay: the goals at a third of the grid's steps ----

CITY_SEEDS, LANDSCAPES, LANDSCAPE_SEEDS = 200, 100, 10


def replay_figures(results_with_grid: Path) -> dict:
    """Every strategy of tune_replay.SEARCH_STRATEGIES on the city grid, the package domain's grid when one was
    recorded (`package_grid`) and the synthetic family."""
    import warnings

    import optuna
    import tune_replay

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # experimental-option warnings of Optuna, once per sampler
    recorded = read_json(results_with_grid)
    city = tune_replay.Grid.from_record(recorded["grid"])
    families, seeds = {"city": [city]}, {"city": CITY_SEEDS}
    if "package_grid" in recorded:
        families[PACKAGE_DOMAIN] = [tune_replay.Grid.from_record(recorded["package_grid"])]
        seeds[PACKAGE_DOMAIN] = CITY_SEEDS
    families["synthetic"] = [tune_replay.synthetic_grid(k) for k in range(LANDSCAPES)]
    seeds["synthetic"] = LANDSCAPE_SEEDS
    chosen = {s.name: s for s in tune_replay.strategies() if s.name in tune_replay.SEARCH_STRATEGIES}
    grid_steps = {family: grids[0].steps for family, grids in families.items()}  # every landscape has one shape
    started, figures = time.perf_counter(), {}
    for name, strategy in chosen.items():
        figures[name] = tune_replay.budget_searches(strategy, families, seeds)
        print(tune_replay.budget_line(name, figures[name]), flush=True)
    bound = bound_figures(families, seeds)
    return {
        "within_1pct_at_third": {n: {fam: f[fam]["within_at_budget"] for fam in families} for n, f in figures.items()},
        "median_regret_at_third": {n: {fam: f[fam]["median_regret_at_budget"] for fam in families}
                                   for n, f in figures.items()},
        "steps_to_within_1pct": {n: {fam: f[fam]["steps_to_within"] for fam in families} for n, f in figures.items()},
        "replay": {
            "strategies": {name: strategy.summary for name, strategy in chosen.items()},
            "budget_steps": {family: int(steps * tune_replay.BUDGET_SHARE) for family, steps in grid_steps.items()},
            "grid_steps": grid_steps, "grid_best": {family: grids[0].best for family, grids in families.items()
                                                    if family != "synthetic"},
            "seeds": {family: seeds[family] for family in families if family != "synthetic"},
            "synthetic": {"landscapes": LANDSCAPES, "seeds_per_landscape": LANDSCAPE_SEEDS,
                          "first_seed": tune_replay.SYNTHETIC_SEED},
            "seconds": round(time.perf_counter() - started, 1),
            "note": "regret: best finished eval loss once a third of the grid's steps was spent (a trial that "
                    "crosses the budget does not count) over the grid's best, minus 1; steps to within 1%: a "
                    "search that never got there (it stops after the grid's steps or 60 trials) counts the "
                    "grid's steps, a lower bound; `not_reached` counts them",
            "detail": figures},
        "bound_clairvoyant_pruner": bound}


BOUNDS = {"tailor": "bound-clairvoyant-pruner-step2", "random": "bound-clairvoyant-pruner-step2-random"}


def bound_figures(families: dict[str, list], seeds: dict[str, int]) -> dict:
    """How far pruning alone could take a search: tailor's sampler, and random search's, each with a pruner that
    knows every point's final value and stops at the first report (step 2) every trial that will not beat the best
    so far."""
    import tune_replay

    by_name = {s.name: s for s in tune_replay.strategies()}
    bounds = {}
    for sampler, name in BOUNDS.items():
        strategy = tune_replay.as_now(by_name[name])
        found = tune_replay.budget_searches(strategy, families, seeds)
        print(tune_replay.budget_line(name, found), flush=True)
        bounds[sampler] = {"strategy": name, "summary": strategy.summary,
                           **{family: {key: f[key] for key in ("within_at_budget", "at_best_at_budget",
                                                                "median_regret_at_budget", "mean_regret_at_budget",
                                                                "steps_to_within")}
                              for family, f in found.items()}}
    return bounds


# ---- the continuous search on the real objective ----

CONTINUOUS_SPACE = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "methods.lora.r": {"type": "int", "low": 4, "high": 32, "log": True},
                    "methods.lora.alpha": {"type": "int", "low": 8, "high": 64, "log": True},
                    "train.epochs": {"type": "int", "low": 1, "high": 3}}
CONTINUOUS = {"trials": 12, "seeds": 3, "overrides": [], "eval_records": None}
CONTINUOUS_QUICK = {"trials": 2, "seeds": 1, "eval_records": EVAL_RECORDS,
                    "overrides": ["train.max_steps=2", "tune.report_every=1", "eval.max_new_tokens=8"]}
CONTINUOUS_STRATEGIES = {"tailor": ["tune.sampler=bayesian"], "random": ["tune.sampler=random", "tune.pruner=none"]}


def study_figures(study, space: dict, seconds: float | None = None) -> dict | None:
    """A continuous study's figures as far as it ran: best token F1 and its point, training steps, finished and
    pruned trials (None before its first complete trial)."""
    import optuna

    from tailor.tune.space import params_to_values

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in states]
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    return {"best_token_f1": round(best.value, 4), "steps": trial_steps(study),
            "best": params_to_values(best.params, space), "trials": len(finished),
            "pruned": len(finished) - len(complete), "seconds": seconds}


def collected(config, run_dir: Path) -> dict | None:
    """`study_figures` of a study on disk, training nothing (None when there is none)."""
    from tailor.tune.search import open_study

    if not (run_dir / "tune" / "study.db").is_file():
        return None
    return study_figures(open_study(config, run_dir), config.tune.space)


def continuous_search(cache: Path, quick: bool, seeds: int | None = None, collect: bool = False,
                      strategies: list[str] | None = None, only_seeds: list[int] | None = None) -> dict:
    """12 trials (quick: 2) of each strategy per tune seed (the first `seeds` of them), through tailor's own
    `run_tune`; `collect`: only read the studies as far as they ran; `strategies` and `only_seeds`: train only
    these (the other studies are read as they are), e.g. one study per process so that studies advance side by
    side without two processes adding trials to one study."""
    scale = dict(CONTINUOUS_QUICK if quick else CONTINUOUS)
    wanted = scale["seeds"] if seeds is None or only_seeds else min(seeds, scale["seeds"])
    # the example's training settings; the search's settings those of the grid benchmark (tailor's default pruner
    # and warm-up, its start-up trials)
    overrides = ["train.save_every=0", "eval.limit=0", "tune.metric=token_f1",
                 f"tune.startup_trials={STARTUP_TRIALS}", "tune.pruner_warmup_steps=null",
                 f"tune.trials={scale['trials']}", *scale["overrides"]]
    data = apply_overrides(load_raw(EXAMPLE / "tailor.yaml"), overrides)
    data.setdefault("tune", {})["space"] = CONTINUOUS_SPACE
    folder = cache / ("continuous-quick" if quick else "continuous")
    if quick:
        shutil.rmtree(folder, ignore_errors=True)  # a smoke run measures nothing worth resuming
    per_seed: dict[str, dict] = {}
    for seed in range(wanted):
        per_seed[str(seed)] = {}
        for name, strategy_overrides in CONTINUOUS_STRATEGIES.items():
            tuned = apply_overrides(data, [*strategy_overrides, f"tune.seed={seed}"])
            config = validate_config(tuned, f"continuous ({name})")
            run_dir = folder / f"{name}-seed{seed}"
            if collect or (strategies and name not in strategies) or (only_seeds and seed not in only_seeds):
                found = collected(config, run_dir)
                if found is not None:
                    per_seed[str(seed)][name] = found
                continue
            prepare_run(run_dir, config, EXAMPLE, eval_records=scale["eval_records"])
            started = time.perf_counter()
            result = run_tune(config, tuned, EXAMPLE, run_dir, source=f"benchmark continuous ({name})")
            per_seed[str(seed)][name] = study_figures(result.study, config.tune.space,
                                                      round(time.perf_counter() - started, 1))
            print(f"continuous seed {seed} {name}: {per_seed[str(seed)][name]}", flush=True)
    per_seed = {seed: found for seed, found in per_seed.items() if found}
    done = sum(len(found) == len(CONTINUOUS_STRATEGIES) and all(f["trials"] >= scale["trials"]
                                                                for f in found.values())
               for found in per_seed.values())
    full = "complete" if done == scale["seeds"] else (
        f"partial: {done} of {scale['seeds']} seeds complete" + "".join(
            f"; seed {seed} {name} {f['trials']} of {scale['trials']} trials"
            for seed, found in per_seed.items() for name, f in found.items() if f["trials"] < scale["trials"]))
    status = (full if not quick else
              f"smoke run only ({scale['trials']} trials per strategy, {scale['seeds']} seed, 2-step trials, "
              f"{EVAL_RECORDS} questions): it shows the path works and measures nothing; the full run "
              f"(`python benchmarks/tune.py --continuous`: {CONTINUOUS['trials']} trials x {CONTINUOUS['seeds']} "
              "seeds) is pending")
    return {"status": status, "quick": quick, "seeds": per_seed, "space": CONTINUOUS_SPACE,
            "strategies": {name: " ".join(o) for name, o in CONTINUOUS_STRATEGIES.items()},
            "overrides": overrides, "metric": "token_f1 on the held-out answers (higher is better)",
            "steps_note": "training steps of all trials; a pruned trial counts the steps it ran"}


# ---- goals ----

def goals(results: dict) -> dict:
    within, regret = results["within_1pct_at_third"], results["median_regret_at_third"]
    found = {}
    for family in ("city", "synthetic"):
        found[f"within_1pct_at_third.tailor.{family}"] = {
            "value": within["tailor"][family], "goal": ">= 0.9", "met": within["tailor"][family] >= 0.9}
        ours, theirs = regret["tailor"][family], regret["random"][family]
        found[f"median_regret_at_third.tailor_below_random.{family}"] = {
            "value": {"tailor": ours, "random": theirs}, "goal": "tailor < random",
            "met": ours is not None and theirs is not None and ours < theirs}
    continuous = results.get("continuous_search")
    key = "continuous_search.tailor_f1_at_least_random_in_2_of_3_seeds_with_fewer_steps"
    # a seed counts once both strategies ran their trials in full
    compared = [] if not continuous or continuous.get("quick") else [
        seed for seed in continuous["seeds"].values()
        if set(seed) >= set(CONTINUOUS_STRATEGIES) and min(f["trials"] for f in seed.values()) >= CONTINUOUS["trials"]]
    wins = sum(seed["tailor"]["best_token_f1"] >= seed["random"]["best_token_f1"]
               and seed["tailor"]["steps"] < seed["random"]["steps"] for seed in compared)
    needed, seeds = 2, CONTINUOUS["seeds"]
    goal = f">= {needed} of {seeds} seeds"
    if not continuous or continuous.get("quick"):
        found[key] = {"value": None, "goal": goal, "met": None,
                      "status": f"pending ({continuous['status'] if continuous else 'no run'})"}
    else:
        # decided once the seeds still running can no longer change the count
        pending = seeds - len(compared)
        met = True if wins >= needed else False if wins + pending < needed else None
        found[key] = {"value": f"{wins} of {len(compared)}" + (f" (of {seeds}; {pending} still running)"
                                                                if pending else ""),
                      "goal": goal, "met": met, "status": continuous["status"]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="With --continuous: a smoke run of the continuous search. The replay is always whole.")
    parser.add_argument("--continuous", action="store_true", help="Also run the continuous search (trains).")
    parser.add_argument("--continuous-seeds", type=int, default=None,
                        help="With --continuous: run only the first N tune seeds (of 3).")
    parser.add_argument("--collect", action="store_true",
                        help="With --continuous: train nothing; report the studies as far as they ran.")
    parser.add_argument("--continuous-strategy", action="append", choices=list(CONTINUOUS_STRATEGIES),
                        help="With --continuous: train only this strategy (repeatable); the others are read.")
    parser.add_argument("--continuous-seed", type=int, action="append",
                        help="With --continuous: train only this tune seed (repeatable); the others are read.")
    parser.add_argument("--record-grid", action="store_true", help="Train the grid again before the replay.")
    parser.add_argument("--record-package-grid", action="store_true",
                        help="Train the grid on Privoxy's manuals (pairs synthesized from them) before the replay "
                             "(about 25 minutes; resumed from --cache).")
    parser.add_argument("--rank-noise", action="store_true",
                        help="Also train the grid's ranks at its best learning rate with other training seeds "
                             "(9 trials, about 15 minutes; resumed from --cache).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the training (default 1: the machine is shared; give it all cores "
                             "when the continuous search has the machine to itself).")
    parser.add_argument("--cache", type=Path, default=CACHE, help="Where the trained studies are kept.")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="Written here; its other keys (and, when it exists, its grid) are kept.")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # on a shared machine a second thread mostly waits for a core

    # the recorded grid and earlier keys come from --results when it exists, else from the committed results
    results = read_json(args.results if args.results.is_file() else RESULTS)
    if args.record_grid:
        results["grid"] = record_grid(args.cache)
    if args.record_package_grid:
        results["package_grid"] = record_grid(args.cache, PACKAGE_DOMAIN)
    write_json(args.results, results)  # the replay reads the grid from here
    results.update(replay_figures(args.results))
    if args.rank_noise:
        results["rank_noise"] = rank_noise(args.cache, results["grid"])
    if args.continuous:
        results["continuous_search"] = continuous_search(args.cache, args.quick, args.continuous_seeds, args.collect,
                                                         args.continuous_strategy, args.continuous_seed)
    results["goals"] = goals(results)
    write_json(args.results, results)
    print(json.dumps(results["goals"], indent=1))


if __name__ == "__main__":
    main()
