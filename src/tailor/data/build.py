"""`tailor data build`: the workspace's data files → the datasets training reads, all in RUN/data/.

    data.qa_files (+ eval_files)   Q/A, Alpaca, ShareGPT, OpenAI chat, transcripts → train.jsonl, eval.jsonl
                                   (and test.jsonl with data.test_fraction)
    data.classification_files      {text, label} → classification/{train,eval,test}.jsonl, labels.json
    data.preference_files          preference pairs → preferences.jsonl (read by dpo, orpo, reward, ...)
    data.pretrain_block_tokens     RUN/corpus.jsonl → pretrain/{train,eval}.jsonl token blocks

Splits are deterministic by content hash; held-out records that copy training ones are reported and dropped.
"""

from __future__ import annotations

from pathlib import Path

from tailor.config import TailorConfig
from tailor.data.qa import BuildSummary, build_chat_datasets
from tailor.errors import TailorError
from tailor.workspace import update_manifest, write_json, write_jsonl


def build_chat_data(config: TailorConfig, root: Path, run_dir: Path) -> BuildSummary:
    data = config.data
    qa_files = [root / f for f in data.qa_files]
    eval_files = [root / f for f in data.eval_files]
    if not (qa_files or eval_files or data.classification_files or data.preference_files
            or data.pretrain_block_tokens):
        raise TailorError("data.qa_files: nothing to build; name question/answer files (or data.classification_files,"
                          " data.preference_files, data.pretrain_block_tokens)")
    tokenizer = None

    def loaded_tokenizer():
        nonlocal tokenizer
        if tokenizer is None:
            from tailor.models.base import load_tokenizer, resolve_base_model

            tokenizer = load_tokenizer(resolve_base_model(config.base_model, root=root))
        return tokenizer

    def count_tokens(messages: list[dict]) -> int:
        from tailor.train.examples import count_chat_tokens

        return count_chat_tokens(loaded_tokenizer(), messages)

    data_dir = Path(run_dir) / "data"
    summary, outputs, inputs = BuildSummary(), [], list(qa_files + eval_files)
    if qa_files or eval_files:  # eval files alone: a method that trains on nothing (rag) is still evaluated
        train, evals, summary = build_chat_datasets(
            qa_files, eval_files, system_prompt=config.system_prompt, eval_fraction=data.eval_fraction,
            seed=data.seed, max_tokens=data.max_tokens, count_tokens=count_tokens, test_fraction=data.test_fraction,
            leak_threshold=data.leak_threshold, speaker_roles=config.ingest.speaker_roles)
        if qa_files:
            write_jsonl(data_dir / "train.jsonl", train)
            outputs.append(data_dir / "train.jsonl")
        write_jsonl(data_dir / "eval.jsonl", evals)
        outputs.append(data_dir / "eval.jsonl")
        if summary.test_records:
            write_jsonl(data_dir / "test.jsonl", summary.test_records)
            outputs.append(data_dir / "test.jsonl")
    if data.classification_files:
        from tailor.data.classify import read_classification_file, split_classification

        files = [root / f for f in data.classification_files]
        label_set = set(data.labels) if data.labels else None
        records = [record for path in files for record in read_classification_file(path, label_set)]
        splits = split_classification(records, eval_fraction=data.eval_fraction, test_fraction=data.test_fraction,
                                      seed=data.seed, labels=data.labels or None, leak_threshold=data.leak_threshold)
        folder = data_dir / "classification"
        for name in ("train", "eval", "test"):
            write_jsonl(folder / f"{name}.jsonl", getattr(splits, name))
            outputs.append(folder / f"{name}.jsonl")
        write_json(folder / "labels.json", splits.labels)
        summary.extra["classification"] = splits.counts()
        inputs += files
    if data.preference_files:
        from tailor.data.preference import load_preference_file

        files = [root / f for f in data.preference_files]
        pairs = [pair for path in files for pair in load_preference_file(path, count_tokens=count_tokens,
                                                                          max_tokens=data.max_tokens)]
        write_jsonl(data_dir / "preferences.jsonl", pairs)
        outputs.append(data_dir / "preferences.jsonl")
        summary.extra["preference_pairs"] = len(pairs)
        inputs += files
    if data.pretrain_block_tokens:
        from tailor.data.pretrain import build_pretrain_blocks

        corpus = Path(run_dir) / "corpus.jsonl"
        blocks_train, blocks_eval = build_pretrain_blocks(
            corpus, loaded_tokenizer(), block_tokens=data.pretrain_block_tokens,
            overlap_tokens=data.pretrain_overlap_tokens, eval_fraction=data.eval_fraction, seed=data.seed)
        write_jsonl(data_dir / "pretrain" / "train.jsonl", blocks_train)
        write_jsonl(data_dir / "pretrain" / "eval.jsonl", blocks_eval)
        outputs += [data_dir / "pretrain" / "train.jsonl", data_dir / "pretrain" / "eval.jsonl"]
        summary.extra["pretrain_blocks"] = {"train": len(blocks_train), "eval": len(blocks_eval)}
        inputs.append(corpus)
    write_json(data_dir / "report.json", summary.to_dict())
    update_manifest(run_dir, "data", config=config.model_dump(mode="json"), inputs=inputs, outputs=outputs,
                    metrics={"train_records": summary.train, "eval_records": summary.eval,
                             "test_records": summary.test, "too_long": len(summary.too_long),
                             "leaked": len(summary.leaked)})
    return summary
