"""`tailor data build`: the workspace's question/answer files → `data/train.jsonl` and `data/eval.jsonl`."""

from __future__ import annotations

from pathlib import Path

from tailor.config import TailorConfig
from tailor.data.qa import BuildSummary, build_chat_datasets
from tailor.models.base import load_tokenizer, resolve_base_model
from tailor.train.examples import count_chat_tokens
from tailor.workspace import update_manifest, write_json, write_jsonl


def build_chat_data(config: TailorConfig, root: Path, run_dir: Path) -> BuildSummary:
    qa_files = [root / f for f in config.data.qa_files]
    eval_files = [root / f for f in config.data.eval_files]
    tokenizer = load_tokenizer(resolve_base_model(config.base_model, root=root))
    train, evals, summary = build_chat_datasets(
        qa_files, eval_files, system_prompt=config.system_prompt, eval_fraction=config.data.eval_fraction,
        seed=config.data.seed, max_tokens=config.data.max_tokens,
        count_tokens=lambda messages: count_chat_tokens(tokenizer, messages))
    data_dir = Path(run_dir) / "data"
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "eval.jsonl", evals)
    write_json(data_dir / "report.json", summary.to_dict())
    update_manifest(run_dir, "data", config=config.model_dump(mode="json"), inputs=qa_files + eval_files,
                    outputs=[data_dir / "train.jsonl", data_dir / "eval.jsonl"],
                    metrics={"train_records": summary.train, "eval_records": summary.eval,
                             "too_long": len(summary.too_long)})
    return summary
