"""Training throughput, memory and quality of tailor's core against transformers' Trainer + peft LoRA.

    python benchmarks/train.py [--quick] [--steps N] [--out FILE]    → benchmarks/results/train.json and train.md

Same data, same LoRA (tailor's defaults: r 16, alpha 32, every attention and MLP projection), same optimizer
(AdamW), learning rate, cosine schedule, warmup, clipping, batch size and number of optimizer steps, on the default
model (SmolLM2-135M-Instruct). The sides:

- `trainer_fp32`: transformers `Trainer`, dynamic padding (`DataCollatorForSeq2Seq`), default precision (fp32);
- `trainer_bf16`: the same with `bf16=True` (autocast over fp32 weights);
- `tailor`: tailor's core (`tailor.train.loop.train`): packed rows, frozen base stored in bf16, the output
  projection on answer tokens only, chunked cross-entropy.

The data is generated deterministically from the city example's documents: one question per answer, answers cut
from the documents at lengths spread evenly from 4 to 400 tokens, with the example's system prompt; one epoch of
exactly steps x batch examples, so both sides see the same examples (each in its own order). Each side runs in its
own subprocess (peak RSS = its ru_maxrss) on one thread by default; tokens/s counts real (non-padding) tokens over
the CPU time the process spent training, model loading excluded: on a CPU shared with other work the wall clock
measures the neighbours as much as the code, the CPU time of a one-thread process far less. The eval loss of every
side's adapter is measured afterwards by one procedure (fp32 base, `tailor.train.loop.evaluate_loss`) on the same
held-out examples. MFU = tokens/s x 4N (the base is frozen; N = the model's parameters) / the bf16 peak: the matmul
throughput the tailor side's own process reaches right after training, on its torch threads, by CPU time like its
tokens/s. The peak is the best per-shape median over several windows of repeated GEMMs (a large square one and the
model's MLP shapes), each shape warmed up first: a single timed matmul, as measured before, swung from 0.20 to 1.28
TFLOP/s between runs on the same kind of machine (clock granularity, a cold first call), and the MFU with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
EXAMPLE = ROOT / "examples" / "city-services"
SIDES = ("trainer_fp32", "trainer_bf16", "tailor")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
HYPER = {"learning_rate": 1e-3, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0}


# ---------------------------------------------------------------- data

def city_text() -> list[tuple[str, list[str]]]:
    """(title, words) of the example's plain-text and markdown documents."""
    documents = []
    for path in sorted((EXAMPLE / "docs").iterdir()):
        if path.suffix in (".md", ".txt") and "copy" not in path.stem:
            words = re.sub(r"[#*_`>]", " ", path.read_text(encoding="utf-8")).split()
            documents.append((path.stem.replace("-", " "), words))
    return documents


def make_records(count: int, seed: int, tokenizer) -> list[dict]:
    """Chat records whose answers run from 4 to 400 tokens, evenly spread, cut from the city documents."""
    import yaml

    system = yaml.safe_load((EXAMPLE / "tailor.yaml").read_text())["system_prompt"]
    documents = city_text()
    rng = random.Random(seed)
    records = []
    for index in range(count):
        title, words = documents[index % len(documents)]
        target = 4 + round((400 - 4) * ((index * 0.618034 + seed * 0.1) % 1.0))  # low-discrepancy spread
        start = rng.randrange(len(words))
        # every word is at least one token: `target` words hold at least `target` tokens
        answer = " ".join(words[(start + i) % len(words)] for i in range(target))
        ids = tokenizer(answer)["input_ids"][:target]
        records.append({"messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": f"What does the {title} page say? ({index})"},
                                     {"role": "assistant", "content": tokenizer.decode(ids).strip()}]})
    return records


def examples_of(records: list[dict], tokenizer):
    from tailor.train.examples import tokenize_chat

    return [tokenize_chat(tokenizer, r["messages"], where=f"record {i}") for i, r in enumerate(records)]


# ---------------------------------------------------------------- workers (one per subprocess)

def speed(tokens: int, wall: float, cpu: float) -> dict:
    """tokens/s by the CPU time of this process, which other processes on a shared machine barely change (with one
    thread it is the single-core throughput), and by the wall clock."""
    return {"tokens": tokens, "seconds": cpu, "wall_seconds": wall, "tokens_per_s": tokens / cpu,
            "tokens_per_wall_s": tokens / wall}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_trainer(side: str, work: Path, steps: int, batch_size: int) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from tailor.methods.lora import LoraOptions
    from tailor.models.base import load_tokenizer, resolve_base_model

    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    records = json.loads((work / "train.json").read_text())
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples_of(records, tokenizer)]
    torch.manual_seed(HYPER["seed"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                       lora_dropout=LORA["dropout"],
                                                       target_modules=LoraOptions().targets, task_type="CAUSAL_LM"))
    real_tokens = [0]
    model.register_forward_pre_hook(lambda _, args, kwargs: real_tokens.__setitem__(
        0, real_tokens[0] + int(kwargs["attention_mask"].sum())), with_kwargs=True)
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *_, **__):
            clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()

    args = TrainingArguments(output_dir=str(work / side), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=HYPER["learning_rate"],
                             warmup_steps=int(HYPER["warmup_ratio"] * steps),  # as tailor rounds it
                             lr_scheduler_type="cosine", max_grad_norm=HYPER["max_grad_norm"],
                             weight_decay=HYPER["weight_decay"], optim="adamw_torch", seed=HYPER["seed"],
                             bf16=side == "trainer_bf16", use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", report_to=[], logging_steps=1, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    model.save_pretrained(work / side / "adapter")
    return {**speed(real_tokens[0], clock["end"] - clock["start"], clock["cpu_end"] - clock["cpu_start"]),
            "peak_rss_mb": peak_rss_mb(), "steps": steps,
            "parameters": sum(p.numel() for p in model.get_base_model().parameters())}


def run_tailor(side: str, work: Path, steps: int, batch_size: int, compile_: bool = False,
               measure_peak: bool = False) -> dict:
    import torch

    from tailor.config import validate_config
    from tailor.methods.artifacts import load_for_training
    from tailor.models.base import load_tokenizer, resolve_base_model
    from tailor.train.loop import train
    from tailor.train.run import seed_everything

    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    examples = examples_of(json.loads((work / "train.json").read_text()), tokenizer)
    config = validate_config({"base_model": base, "methods": {"lora": LORA}, "train": {
        "method": "lora", "max_steps": steps, "batch_size": batch_size, "scheduler": "cosine", "save_every": 0,
        "dtype": "bf16", "compile": compile_, **HYPER}})
    seed_everything(HYPER["seed"])
    model = load_for_training(config, base, torch.bfloat16)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(model, examples, [], config.train, work / side, pad_id=tokenizer.pad_token_id,
                   compute_dtype=torch.bfloat16, show_progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    model.save_pretrained(work / side / "adapter")
    measured = {**speed(result.tokens, wall, cpu), "peak_rss_mb": peak_rss_mb(), "steps": result.steps,
                "parameters": sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)}
    if measure_peak:  # after training and the RSS reading: same process, same threads, warm
        measured["bf16_peak"] = bf16_peak(model.config.hidden_size, model.config.intermediate_size)
    return measured


def run_eval(work: Path, sides: list[str]) -> dict:
    """Eval loss per answer token of the untouched base and of every side's adapter: fp32, one procedure."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from tailor.models.base import load_tokenizer, resolve_base_model
    from tailor.train.loop import evaluate_loss

    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    examples = examples_of(json.loads((work / "eval.json").read_text()), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    losses = {"base": evaluate_loss(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id)}
    for side in sides:
        tuned = peft.PeftModel.from_pretrained(model, str(work / side / "adapter"))
        losses[side] = evaluate_loss(tuned, examples, batch_size=8, pad_id=tokenizer.pad_token_id)
        model = tuned.unload()
    return losses


def bf16_peak(hidden: int, intermediate: int, *, windows: int = 7, window_s: float = 0.25,
              warmup_s: float = 0.5) -> dict:
    """The bf16 matmul throughput this process reaches on its torch threads, in FLOP per CPU second (the MFU
    denominator): per shape, `windows` timings of GEMMs repeated for at least `window_s` CPU seconds after a
    `warmup_s` warm-up; the median per shape, and the best shape's median as the peak."""
    import statistics

    import torch

    tokens = 4096  # rows of one packed batch, about
    shapes = {"square_2048": (2048, 2048, 2048), "mlp_up": (tokens, hidden, intermediate),
              "mlp_down": (tokens, intermediate, hidden)}
    per_shape = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        started = time.process_time()
        while time.process_time() - started < warmup_s:
            a @ b
        rates, wall_rates = [], []
        for _ in range(windows):
            calls, cpu_started, wall_started = 0, time.process_time(), time.perf_counter()
            while (cpu := time.process_time() - cpu_started) < window_s:
                a @ b
                calls += 1
            flops = 2 * m * k * n * calls
            rates.append(flops / cpu)
            wall_rates.append(flops / (time.perf_counter() - wall_started))
        per_shape[name] = {"shape": [m, k, n], "tflops_median": statistics.median(rates) / 1e12,
                           "tflops_min": min(rates) / 1e12, "tflops_max": max(rates) / 1e12,
                           "tflops_wall_median": statistics.median(wall_rates) / 1e12}
    best = max(per_shape, key=lambda name: per_shape[name]["tflops_median"])
    return {"bf16_flops": per_shape[best]["tflops_median"] * 1e12, "shape": best, "per_shape": per_shape,
            "threads": torch.get_num_threads(), "windows": windows, "window_cpu_s": window_s, "warmup_cpu_s": warmup_s}


# ---------------------------------------------------------------- driver

def subprocess_json(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        sys.exit(f"worker {args[:2]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["| side | tokens/s (CPU time) | tokens/s (wall) | peak RSS (MB) | eval loss | CPU seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for side, r in results["sides"].items():
        lines.append(f"| {side} | {r['tokens_per_s']:.0f} | {r['tokens_per_wall_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['eval_loss']:.4f} | {r['seconds']:.1f} |")
    lines.append(f"| base (untrained) | | | | {results['base_eval_loss']:.4f} | |")
    lines += ["", "| ratio | value | goal |", "| --- | --- | --- |"]
    for key, goal in (("tokens_per_s_ratio", "≥ 3"), ("tokens_per_s_ratio_vs_bf16", ""),
                      ("peak_rss_ratio", "≤ 0.6"), ("eval_loss_rel_diff", "≤ 0.02"), ("mfu", "≥ 0.35")):
        lines.append(f"| {key} | {results[key]:.3f} | {goal} |")
    peak = results["bf16_peak"]
    spread = peak["per_shape"][peak["shape"]]
    lines += ["", f"bf16 peak (MFU denominator): {results['bf16_peak_tflops']:.3f} TFLOP/s per CPU second on "
              f"{peak['threads']} thread(s), median of {peak['windows']} windows on {peak['shape']} "
              f"(windows {spread['tflops_min']:.3f} to {spread['tflops_max']:.3f}); per shape: "
              + ", ".join(f"{name} {r['tflops_median']:.3f}" for name, r in peak["per_shape"].items())]
    return "\n".join(lines) + "\n"


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps of 4 examples per side, 8 eval examples")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time tailor with train.compile: true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1: see above)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results JSON; the table is written beside it "
                        "as .md.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = arguments().parse_args()
    steps = 4 if args.quick else args.steps
    if args.quick:
        args.batch_size, args.eval_examples = 4, 8

    if args.worker:  # inside a subprocess: one measurement, one JSON line on stdout
        import torch

        torch.set_num_threads(args.threads)
        if args.worker.startswith("trainer"):
            out = run_trainer(args.worker, args.work, steps, args.batch_size)
        elif args.worker.startswith("tailor"):
            out = run_tailor(args.worker, args.work, steps, args.batch_size, compile_=args.worker.endswith("compile"),
                             measure_peak=args.worker == "tailor")
        elif args.worker == "eval":
            out = run_eval(args.work, json.loads(os.environ["BENCH_SIDES"]))
        else:
            sys.exit(f"unknown worker {args.worker}")
        print(json.dumps(out))
        return

    from tailor.models.base import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct"))
    sides = list(SIDES) + (["tailor_compile"] if args.compile else [])
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as tmp:
        work = Path(tmp)
        (work / "train.json").write_text(json.dumps(make_records(steps * args.batch_size, 0, tokenizer)))
        (work / "eval.json").write_text(json.dumps(make_records(args.eval_examples, 1, tokenizer)))
        common = ["--work", str(work), "--steps", str(steps), "--batch-size", str(args.batch_size),
                  "--threads", str(args.threads)]
        measured = {}
        for side in sides:
            print(f"{side}: training {steps} steps …", file=sys.stderr, flush=True)
            measured[side] = subprocess_json(["--worker", side, *common])
            print(f"{side}: {measured[side]['tokens_per_s']:.0f} tokens/s, "
                  f"{measured[side]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        os.environ["BENCH_SIDES"] = json.dumps(sides)
        losses = subprocess_json(["--worker", "eval", *common])
    for side in sides:
        measured[side]["eval_loss"] = losses[side]
    ours, fp32, bf16 = measured["tailor"], measured["trainer_fp32"], measured["trainer_bf16"]
    results = {
        "tokens_per_s_ratio": ours["tokens_per_s"] / fp32["tokens_per_s"],
        "tokens_per_s_ratio_vs_bf16": ours["tokens_per_s"] / bf16["tokens_per_s"],
        "tokens_per_wall_s_ratio": ours["tokens_per_wall_s"] / fp32["tokens_per_wall_s"],
        "peak_rss_ratio": ours["peak_rss_mb"] / fp32["peak_rss_mb"],
        "eval_loss_rel_diff": abs(ours["eval_loss"] - fp32["eval_loss"]) / fp32["eval_loss"],
        "mfu": ours["tokens_per_s"] * 4 * ours["parameters"] / ours["bf16_peak"]["bf16_flops"],
        "base_eval_loss": losses["base"],
        "bf16_peak_tflops": ours["bf16_peak"]["bf16_flops"] / 1e12, "bf16_peak": ours.pop("bf16_peak"),
        "threads": args.threads,
        "steps": steps, "batch_size": args.batch_size, "eval_examples": args.eval_examples, "quick": args.quick,
        "hyperparameters": HYPER | {"lora": LORA}, "sides": measured,
        "clock": "tokens/s per second of process CPU time (see the module docstring); *_wall_* by the wall clock",
    }
    if "tailor_compile" in measured:
        results["compile_speedup"] = measured["tailor_compile"]["tokens_per_s"] / ours["tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = f"# Training benchmark ({steps} steps x {args.batch_size} examples)\n\n" + table(results)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
