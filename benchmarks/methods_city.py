"""Every customization method on the city example with the default model, each evaluated like `tailor eval`.

    python benchmarks/methods_city.py [--steps 12] [--limit 10] [--max-new-tokens 24] [--methods a,b,…]
        → benchmarks/results/methods_city.json (and runs/methods-city/compare/<method>/, one run folder each)

The example's documents are ingested and its Q/A files built into runs/methods-city/ as `tailor demo` does; then
`tailor compare`'s code (tailor.cli.compare.run_compare) trains or builds each method on those same linked data files
for a few optimizer steps and evaluates it with the `tailor eval` harness on the same first `--limit` held-out
questions (greedy, `--max-new-tokens`), the base model scored once. A method that fails is recorded with its reason
and the others still run. Per method the JSON gives steps, training seconds, eval loss, token F1, exact match,
trainable parameters, artifact size and the mean latency of one greedy answer; each run folder keeps its
`eval/report.json` and `predictions.jsonl` (`tailor eval -r runs/methods-city/compare/lora` reruns one).

Settings: the example's tailor.yaml (LoRA r 16, lr 2e-3, batch 8) with these changes, all recorded in the JSON:
`full` at lr 5e-5 (a whole-model update needs a far smaller step than an adapter), `continued_pretraining` 4 steps
on 256-token corpus blocks, then SFT (a corpus-only model does not answer chat questions), `from_scratch` the
`small` preset, `distill` with
the run's `lora` as the teacher (KL at the answer tokens + cross-entropy on the reference answers; the teacher's
own answers to all 536 training questions would cost more than every other method together on a CPU).
These are short runs on a shared CPU: they show that every method trains, loads and is evaluated end to end, and
their order of magnitude; they are not tuned results. from_scratch's eval loss is per token of its own, smaller
vocabulary, so it does not compare directly with the others'.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "methods_city.json"
RUN = ROOT / "runs" / "methods-city"  # runs/ is not versioned
# the trained and built methods of issue #4, cheapest first; reward/dpo/ppo train on preferences, not Q/A
METHODS = ["prompt", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "ia3", "full", "continued_pretraining",
           "from_scratch", "distill"]


def method_overrides(run_dir: Path, names: list[str]) -> dict[str, list[str]]:
    overrides = {"full": ["train.learning_rate=5e-5"],
                 # 4 corpus steps of 8 blocks of 256 tokens: each corpus step costs ~5 chat steps on this CPU
                 "continued_pretraining": ["methods.continued_pretraining.then_sft=true",
                                           "methods.continued_pretraining.corpus_steps=4",
                                           "methods.continued_pretraining.block_tokens=256"],
                 "from_scratch": ["methods.from_scratch.size=small"],
                 "distill": ["methods.distill.answers=reference"]}
    if "lora" in names and "distill" in names and names.index("lora") < names.index("distill"):
        overrides["distill"].append(f"methods.distill.teacher={run_dir / 'compare' / 'lora'}")
    return {name: values for name, values in overrides.items() if name in names}


def prepare_run(config, root: Path, run_dir: Path) -> None:
    """corpus.jsonl and data/{train,eval}.jsonl from the example, as `tailor ingest` and `tailor data build`."""
    from tailor.data.build import build_chat_data
    from tailor.data.ingest import ingest

    ingest([str(root / source) for source in config.sources], run_dir / "corpus.jsonl", config.ingest, progress=True)
    build_chat_data(config, root, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per trained method.")
    parser.add_argument("--limit", type=int, default=10, help="Held-out questions evaluated.")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="Greedy answer length.")
    parser.add_argument("--latency-questions", type=int, default=2, help="Questions answered one at a time.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods (default: all).")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results JSON.")
    args = parser.parse_args()

    from tailor.cli.app import _quiet_libraries
    from tailor.cli.common import console
    from tailor.cli.compare import compare_table, run_compare
    from tailor.cli.demo import find_example
    from tailor.config import load_config
    from tailor.workspace import write_json

    _quiet_libraries()  # as the `tailor` command: weight-loading bars would drown the training progress
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    common = [f"train.max_steps={args.steps}", "train.save_every=0", f"eval.limit={args.limit}",
              f"eval.max_new_tokens={args.max_new_tokens}"]
    config, root = load_config(find_example(), common)
    per_method = method_overrides(RUN, names)
    started, load_before = time.perf_counter(), os.getloadavg()
    prepare_run(config, root, RUN)
    summary = run_compare(config, root, RUN, names, latency_questions=args.latency_questions,
                          method_overrides=per_method, keep_going=True)
    console.print(compare_table(summary))
    rows = {row["method"]: row for row in summary["methods"]}
    result = {
        "created_at": summary["created_at"], "base_model": config.base_model,
        "example": "examples/city-services", "run_dir": str(RUN.relative_to(ROOT)),
        "settings": {"overrides": common, "method_overrides": per_method,
                     "batch_size": config.train.batch_size, "learning_rate": config.train.learning_rate,
                     "latency_questions": summary["latency_questions"],
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "n_questions": summary["n_questions"],
        # the CPU is shared: the load average says how much the timings were disturbed
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "total_seconds": round(time.perf_counter() - started, 1),
        "base": summary["base"],
        "methods": {name: {key: rows[name][key] for key in ("steps", "train_seconds", "eval_loss", "token_f1",
                                                            "exact_match", "trainable_params", "artifact_bytes",
                                                            "latency_ms")}
                    for name in names if name in rows},
        "failed": summary.get("failed", {}),
    }
    write_json(args.out, result)
    console.print(f"results: {args.out}", soft_wrap=True, highlight=False)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
