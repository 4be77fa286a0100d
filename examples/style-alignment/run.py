"""SFT → PPO, GRPO, DPO and KTO (each starting from the SFT adapter) on the default model, then adherence to the
style guide on held-out questions and the KL of each aligned model to the SFT model.

    python examples/style-alignment/run.py [--out DIR]

Prints a table and writes DIR/alignment.json:
{"models": {"sft": {"adherence": …}, "ppo": {"adherence": …, "kl": …}, "grpo": …, "dpo": …, "kto": …}}.
The same steps as commands (each run folder is its own `-r`):
    tailor data build -w examples/style-alignment -r OUT/sft && tailor train -w … -r OUT/sft
    tailor train -w … -r OUT/ppo --method ppo train.learning_rate=2e-4 methods.ppo.init_adapter=OUT/sft \
        methods.ppo.prompts_file=OUT/sft/data/train.jsonl
    (GRPO like PPO with --method grpo; DPO: train.learning_rate=5e-4 train.max_steps=30 train.batch_size=4
    train.warmup_ratio=0.1; KTO like DPO with methods.kto.examples_file=OUT/thumbs.jsonl)
    tailor train -w … -r OUT/dpo --method dpo methods.dpo.init_adapter=OUT/sft
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rewards import checks, follows_style  # noqa: E402

from tailor.config import load_config  # noqa: E402
from tailor.data.build import build_chat_data  # noqa: E402
from tailor.evaluate.generate import greedy_answers  # noqa: E402
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model  # noqa: E402
from tailor.train.examples import chat_ids  # noqa: E402
from tailor.train.run import run_training  # noqa: E402
from tailor.workspace import read_jsonl, write_json  # noqa: E402

# per-stage settings on top of tailor.yaml: alignment continues the SFT adapter, so smaller steps than SFT's
# PPO at 1e-3 drove the logged KL to ~10 within 3 rollout batches and never raised the reward; 2e-4 over 24
# batches of 16 rollouts does (benchmarks/results/style_alignment.json)
# (the rollout methods run methods.<name>.iterations of their own batches, so the SFT run's train.max_steps and
# batch size go back to their defaults: a train.* key a method would ignore stops the run)
ROLLOUT = ["train.max_steps=0", "train.batch_size=8"]
PPO = ["train.method=ppo", "train.learning_rate=2.0e-4", *ROLLOUT]
GRPO = ["train.method=grpo", "train.learning_rate=2.0e-4", *ROLLOUT]
DPO = ["train.method=dpo", "train.learning_rate=5.0e-4", "train.max_steps=30", "train.batch_size=4",
       "train.warmup_ratio=0.1"]
# KTO sees each preference pair's prompt once, with either its styled (thumbs up) or its plain answer (thumbs down)
KTO = ["train.method=kto", "train.learning_rate=5.0e-4", "train.max_steps=30", "train.batch_size=4",
       "train.warmup_ratio=0.1"]
ALIGNED = ("ppo", "grpo", "dpo", "kto")


# --quick: a smoke run for a busy machine (minutes, not the figures the example is about)
QUICK = ["train.max_steps=12", "train.batch_size=4", "methods.ppo.iterations=3", "methods.ppo.rollout_batch=4",
         "methods.ppo.mini_batch=4", "methods.ppo.max_new_tokens=32", "methods.grpo.iterations=3",
         "methods.grpo.prompts_per_iteration=2", "methods.grpo.group_size=2", "methods.grpo.max_new_tokens=32"]


def thumbs(out: Path) -> Path:
    """Unpaired thumbs for KTO from the preference pairs: alternately the styled answer (up) or the plain one
    (down), so no prompt is seen with both."""
    from tailor.workspace import write_jsonl

    records = [{"prompt": record["prompt"], "completion": record["chosen" if i % 2 == 0 else "rejected"],
                "label": i % 2 == 0} for i, (_, record) in enumerate(read_jsonl(HERE / "preferences.jsonl"))]
    path = out / "thumbs.jsonl"
    write_jsonl(path, records)
    return path


def train(out: Path, name: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    config, root = load_config(HERE, overrides)
    run_dir = out / name
    if name == "sft":
        build_chat_data(config, root, run_dir)
    run_training(config, root, run_dir)
    return time.perf_counter() - started


@torch.no_grad()
def kl_to(model, reference_model, tokenizer, conversations: list[list[dict]], answers: list[str]) -> float:
    """Mean per-token KL(model ‖ reference) over the vocabulary, on the model's own greedy answers."""
    total, tokens = 0.0, 0
    for messages, answer in zip(conversations, answers, strict=True):
        prompt = chat_ids(tokenizer, messages, add_generation_prompt=True)
        full = chat_ids(tokenizer, messages + [{"role": "assistant", "content": answer}])
        ids = torch.tensor([full])
        positions = slice(len(prompt) - 1, len(full) - 1)
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, positions].float(), -1)
        log_q = torch.log_softmax(reference_model(input_ids=ids).logits[0, positions].float(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        tokens += log_p.shape[0]
    return total / max(tokens, 1)


def measure(out: Path, max_new_tokens: int, overrides: list[str], limit: int | None,
            aligned: tuple[str, ...] = ALIGNED) -> dict:
    import peft

    config, root = load_config(HERE, overrides)
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer, dtype = load_tokenizer(base_ref), pick_dtype(config.train.dtype)
    questions = [record["question"] for _, record in read_jsonl(HERE / "qa" / "heldout.jsonl")][:limit]
    conversations = [[{"role": "system", "content": config.system_prompt}, {"role": "user", "content": q}]
                     for q in questions]
    model = peft.PeftModel.from_pretrained(load_model(base_ref, dtype=dtype), str(out / "sft" / "adapter"),
                                           adapter_name="sft").eval()
    for name in aligned:
        model.load_adapter(str(out / name / "adapter"), adapter_name=name)
    results, answers = {}, {}
    for name in ("sft", *aligned):
        model.set_adapter(name)
        answers[name] = greedy_answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                       batch_size=8, compute_dtype=dtype)
        passed = [checks(answer) for answer in answers[name]]
        results[name] = {"adherence": round(sum(map(follows_style, answers[name])) / len(questions), 4),
                         **{check: round(sum(p[check] for p in passed) / len(questions), 4) for check in passed[0]}}
    # KL to the SFT model: a second copy as the reference, so switching adapters cannot mix them up
    reference_model = peft.PeftModel.from_pretrained(load_model(base_ref, dtype=dtype),
                                                     str(out / "sft" / "adapter")).eval()
    for name in aligned:
        model.set_adapter(name)
        results[name]["kl"] = round(kl_to(model, reference_model, tokenizer, conversations, answers[name]), 4)
    return {"models": results, "questions": len(questions),
            "examples": {name: answers[name][:3] for name in answers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "runs", help="Folder for the three run folders.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="Far fewer steps and questions: a smoke run.")
    parser.add_argument("--base-model", help="Another base model (e.g. a small test model folder).")
    parser.add_argument("--methods", default=",".join(ALIGNED), help=(
        f"Aligned methods to train and measure, comma-separated (default {','.join(ALIGNED)})."))
    parser.add_argument("--reuse-sft", action="store_true", help="Keep OUT/sft/adapter when it exists.")
    parser.add_argument("overrides", nargs="*", help=(
        "KEY=VALUE settings for every run (e.g. methods.grpo.iterations=12)."))
    args = parser.parse_args()
    out = args.out.resolve()
    aligned = tuple(name.strip() for name in args.methods.split(",") if name.strip())
    if unknown := set(aligned) - set(ALIGNED):
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ALIGNED)})")
    common = ((QUICK if args.quick else []) + ([f"base_model={args.base_model}"] if args.base_model else [])
              + args.overrides)
    seconds = {}
    if not (args.reuse_sft and (out / "sft" / "adapter" / "adapter_config.json").is_file()):
        seconds["sft"] = train(out, "sft", common)
    prompts = out / "sft" / "data" / "train.jsonl"
    short = ["train.max_steps=6", "train.batch_size=2"] if args.quick else []
    stages = {"ppo": PPO + [f"methods.ppo.prompts_file={prompts}"],
              "grpo": GRPO + [f"methods.grpo.prompts_file={prompts}"],
              "dpo": DPO + short, "kto": KTO + [f"methods.kto.examples_file={thumbs(out)}"] + short}
    for name in aligned:
        seconds[name] = train(out, name, common + stages[name] + [f"methods.{name}.init_adapter={out / 'sft'}"])
    started = time.perf_counter()
    report = measure(out, 40 if args.quick else args.max_new_tokens, common, 8 if args.quick else None, aligned)
    seconds["measure"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    write_json(out / "alignment.json", report)
    print(f"{'model':6} {'adherence':>9} {'department':>10} {'<60 words':>9} {'polite':>6} {'KL to SFT':>9}")
    for name, row in report["models"].items():
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        print(f"{name:6} {row['adherence']:9.3f} {row['names_department']:10.3f} {row['under_60_words']:9.3f} "
              f"{row['polite']:6.3f} {kl:>9}")
    print(f"seconds: {report['seconds']}; written to {out / 'alignment.json'}")


if __name__ == "__main__":
    main()
