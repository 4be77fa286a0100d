"""RAFT, retrieval-augmented fine-tuning (Zhang et al., 2024): LoRA trained to answer from retrieved passages that
mix the one holding the answer (the oracle) with distractors, so the model learns to read the right passage and to
ignore the others, in exactly the grounded prompt it is served with.

Each training pair of RUN/data/train.jsonl becomes one record:
- with probability `oracle_share` (default 1: every record), the oracle among `distractors` hard negatives (the
  best-ranked chunks for the question that do not hold the answer), shuffled; the target is the pair's answer;
- otherwise the distractors alone, and the target is retrieval.abstain_answer: the passages in front of the model do
  not say, so it must not invent (the issue's "the documents do not say" records).
The oracle is the pair's `chunk_id` (pairs from `tailor data synth`) or the chunk holding the most of its answer's
rarer words, within the pair's `source` page when it names one. The artifact is a LoRA adapter with retrieval.json:
evaluation and serving retrieve per question, as `rag` does, and cite the passages.
"""

from __future__ import annotations

import random

from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.lora import LoraOptions
from tailor.methods.lora import load_options as lora_load_options
from tailor.methods.lora import prepare as lora_prepare
from tailor.methods.registry import Method, MethodOptions, Phase, TrainContext, register

KEY = "methods.raft"


class RaftOptions(MethodOptions):
    lora: LoraOptions = Field(default_factory=LoraOptions, description="The adapters that train (as methods.lora).")
    oracle_share: float = Field(1.0, ge=0, le=1, description=(
        "Share of records whose passages include the oracle; the others hold distractors only and teach the "
        "abstention (RAFT's P). 1.0: measured on the city from documents alone (113 synthetic pairs, 3 epochs), "
        "0.8 made the default model abstain on 68 of 98 answerable questions (token F1 0.065), 1.0 reached 0.293 "
        "(base 0.161); abstention is then left to retrieval.min_score."))
    distractors: int = Field(2, ge=0, le=20, description=(
        "Hard negatives per record: the best-ranked chunks for the question that do not hold its answer."))


def raft_messages(messages: list[dict], meta: dict, grounding, options: RaftOptions, seed: int) -> list[dict]:
    """One training conversation in RAFT form: the prompt with oracle and/or distractor passages, then the target."""
    from tailor.retrieval.grounding import gold_chunks, grounded_messages, last_question
    from tailor.retrieval.search import Retrieval

    retriever = grounding.retriever
    prompt, answer = messages[:-1], messages[-1]["content"]
    question = last_question(prompt) or ""
    ranked, _ = retriever.rank(question)
    index = retriever.index
    if meta.get("chunk_id") in index.position:
        gold = {meta["chunk_id"]}
    else:
        gold = gold_chunks(retriever, answer, meta.get("gold_source")).chunks
    gold_positions = [index.position[c] for c in gold if c in index.position]
    # the oracle: the best-ranked chunk that holds the answer (what retrieval would most likely show)
    by_rank = {position: rank for rank, (position, _) in enumerate(ranked)}
    oracle = min(gold_positions, key=lambda p: by_rank.get(p, len(ranked))) if gold_positions else None
    negatives = [(p, s) for p, s in ranked if p not in gold_positions][:options.distractors + 1]
    rng = random.Random(f"{seed}:{question}")  # the same record every run
    with_oracle = oracle is not None and rng.random() < options.oracle_share
    chosen = negatives[:options.distractors] + ([(oracle, 1.0)] if with_oracle else [])
    if not with_oracle:
        chosen = negatives[:max(options.distractors, 1)]
    rng.shuffle(chosen)  # the oracle is not always first: the model must find it
    target = answer if with_oracle else grounding.settings.abstain_answer
    retrieval = Retrieval(query=question, passages=retriever.passages(question, chosen))
    return [*grounded_messages(prompt, retrieval, grounding.settings, grounding.system_prompt),
            {"role": "assistant", "content": target}]


def phases(ctx: TrainContext, tokenizer) -> list[Phase]:
    """The training pairs in RAFT form; the eval loss on the held-out questions grounded as they are served."""
    from tailor.train.examples import tokenize_chat
    from tailor.train.run import load_chat_examples, training_grounding
    from tailor.workspace import read_jsonl

    train_path, eval_path = ctx.run_dir / "data" / "train.jsonl", ctx.run_dir / "data" / "eval.jsonl"
    if not train_path.is_file():
        raise TailorError(f"{train_path}: not found; run `tailor data build` (raft trains on question/answer pairs, "
                          f"e.g. from `tailor data synth`)")
    grounding = training_grounding(ctx.config, ctx.root, ctx.run_dir, tokenizer, force=True)
    train = []
    for line_no, record in read_jsonl(train_path):
        messages = record.get("messages")
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise TailorError(f"{train_path}:{line_no}: expected \"messages\" ending with an assistant answer")
        train.append(tokenize_chat(tokenizer, raft_messages(messages, record, grounding, ctx.options,
                                                            ctx.config.train.seed), where=f"{train_path}:{line_no}"))
    evals = load_chat_examples(eval_path, tokenizer, grounding) if eval_path.is_file() else []
    return [Phase("raft", train, evals)]


register(Method(name="raft", options=RaftOptions,
                prepare=lambda model, options: lora_prepare(model, options.lora, f"{KEY}.lora"),
                load_options=lambda options: lora_load_options(options.lora, f"{KEY}.lora"), artifact="adapter",
                phases=phases,
                grounded=True,
                summary="LoRA trained on retrieved passages: the oracle among distractors, or distractors alone "
                        "with 'the documents do not say' (RAFT); served and evaluated with retrieval."))
