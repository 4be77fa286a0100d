"""Does bayesian search with pruning find the grid's best for a third of the grid's training?

    python benchmarks/tune.py [--quick] [--seed 0]     → benchmarks/results/tune.json and a summary

On the city example with the default model, one search space (learning rate × LoRA r) is searched twice:

* the baseline: a full grid over the space's grid points (`tune.sampler=grid`, no pruning): every point trains its
  full length; its best eval loss is the target;
* bayesian search (TPE, 2 random start-up trials) with the median pruner, in the continuous space the grid
  discretizes, one trial at a time until its best eval loss is at least as good as the grid's best.

`compute_fraction_to_grid_best` is the bayesian search's training steps (pruned trials count the steps they ran)
until it reached the grid's best, divided by the grid's total steps; 1.0 or more means it did not get there for a
third. The metric is the eval loss on held-out answers (`tune.metric=eval_loss`), the same quantity the pruner
sees; trials are short (`--quick`: fewer steps and grid points) to stay affordable on a CPU.

The grid's study is cached in `runs/benchmark-tune/` (SQLite, resumed by `tailor tune`), so a rerun trains only
the bayesian search; delete the folder to measure the grid again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tailor.config import apply_overrides, load_raw, validate_config  # noqa: E402
from tailor.workspace import read_jsonl, write_json, write_jsonl  # noqa: E402

EXAMPLE = ROOT / "examples" / "city-services"
RESULTS = ROOT / "benchmarks" / "results" / "tune.json"
CACHE = ROOT / "runs" / "benchmark-tune"  # runs/ is not versioned
EVAL_RECORDS = 6  # held-out questions for the eval loss; the pruner reads it several times per trial


def settings(quick: bool) -> tuple[list[str], dict]:
    steps = 6
    learning_rates = [3e-4, 1e-3, 3e-3, 1e-2] if quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    ranks = [4, 16]
    overrides = [f"train.max_steps={steps}", "train.batch_size=2", "train.warmup_ratio=0.0", "train.epochs=1",
                 "train.save_every=0", "eval.limit=2", "eval.max_new_tokens=4", "eval.batch_size=2",
                 "tune.metric=eval_loss", "tune.report_every=2", "tune.startup_trials=2"]
    space = {"train.learning_rate": {"type": "float", "low": min(learning_rates), "high": max(learning_rates),
                                     "log": True, "choices": learning_rates},
             "methods.lora.r": {"type": "int", "low": min(ranks), "high": max(ranks), "step": 4,
                                "choices": ranks}}
    return overrides, space


def prepare_run(run_dir: Path, config, root: Path) -> None:
    """RUN/data from the example's Q/A files; the eval file cut to EVAL_RECORDS so each eval is cheap."""
    from tailor.data.build import build_chat_data

    if (run_dir / "data" / "eval.jsonl").is_file():
        return
    build_chat_data(config, root, run_dir)
    records = [record for _, record in read_jsonl(run_dir / "data" / "eval.jsonl")][:EVAL_RECORDS]
    write_jsonl(run_dir / "data" / "eval.jsonl", records)


def search(data: dict, run_dir: Path, sampler: str, trials: int, pruner: str, seed: int):
    from tailor.tune import run_tune

    tuned = apply_overrides(data, [f"tune.sampler={sampler}", f"tune.trials={trials}", f"tune.pruner={pruner}",
                                   f"tune.seed={seed}"])
    return run_tune(validate_config(tuned), tuned, EXAMPLE, run_dir, source=f"benchmark ({sampler})")


def trial_steps(study) -> int:
    return sum(int(trial.user_attrs.get("steps", 0)) for trial in study.trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Shorter trials and a smaller grid.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bayesian search.")
    parser.add_argument("--cache", type=Path, default=CACHE, help="Where the grid's study is kept.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the machine is shared: a second thread mostly waits for a core

    overrides, space = settings(args.quick)
    data = apply_overrides(load_raw(EXAMPLE / "tailor.yaml"), overrides)
    data.setdefault("tune", {})["space"] = space
    config = validate_config(data, "benchmark")
    cache = args.cache / ("quick" if args.quick else "full")

    started = time.perf_counter()
    grid_run = cache / "grid"
    prepare_run(grid_run, config, EXAMPLE)
    grid_size = len(space["train.learning_rate"]["choices"]) * len(space["methods.lora.r"]["choices"])
    grid = search(data, grid_run, "grid", grid_size, "none", 0)
    grid_steps, grid_best = trial_steps(grid.study), grid.best_value
    grid_seconds = round(time.perf_counter() - started, 1)
    print(f"grid: {grid_size} trials, {grid_steps} steps, best eval loss {grid_best:.4f} "
          f"({grid.best_values})", flush=True)

    started = time.perf_counter()
    bayes_run = cache / f"bayesian-{args.seed}"
    shutil.rmtree(bayes_run, ignore_errors=True)  # a fresh study every time: this part is what is measured
    shutil.copytree(grid_run / "data", bayes_run / "data")
    history, reached_at = [], None
    trials = 0
    while True:  # one more trial per call (the study resumes) until it matches the grid or spends as much
        trials += 1
        result = search(data, bayes_run, "bayesian", trials, "median", args.seed)
        trial = result.study.trials[-1]
        steps = trial_steps(result.study)
        history.append({"trial": trial.number, "state": trial.state.name.lower(), "params": trial.params,
                        "value": trial.value, "steps": int(trial.user_attrs.get("steps", 0)),
                        "cumulative_steps": steps})
        print(f"bayesian trial {trial.number} {trial.state.name.lower()}: {trial.value} {trial.params} "
              f"({steps} steps so far)", flush=True)
        # rounded like the reports (4 decimals): a last-digit difference is not a different model
        if round(result.best_value, 4) <= round(grid_best, 4):
            reached_at = steps
            break
        if steps >= grid_steps:
            break
    bayes_seconds = round(time.perf_counter() - started, 1)
    fraction = round(reached_at / grid_steps, 4) if reached_at is not None else None
    results = {
        "compute_fraction_to_grid_best": fraction,
        "goal": 0.33,
        "met": fraction is not None and fraction <= 0.33,
        "metric": "eval_loss (lower is better), held-out answers of the city example",
        "grid": {"trials": grid_size, "steps": grid_steps, "best_value": grid_best, "best": grid.best_values,
                 "seconds": grid_seconds,
                 "values": {json.dumps(t.params, sort_keys=True): t.value for t in grid.study.trials}},
        "bayesian": {"trials": len(history), "steps_to_grid_best": reached_at, "best_value": result.best_value,
                     "best": result.best_values, "seconds": bayes_seconds, "seed": args.seed, "history": history},
        "settings": {"quick": args.quick, "overrides": overrides, "space": space, "eval_records": EVAL_RECORDS,
                     "sampler": "TPE, 2 start-up trials", "pruner": "median (2 start-up trials)"},
        "note": "CPU timings on a machine shared with other work; the step counts are what the goal measures.",
    }
    write_json(args.results, results)
    print(json.dumps({k: results[k] for k in ("compute_fraction_to_grid_best", "goal", "met")}))


if __name__ == "__main__":
    main()
