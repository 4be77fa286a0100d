"""Continued pretraining: causal-LM training on the ingested corpus (domain adaptation), loss on every token,
optionally followed by SFT on the chat records (instruction tuning) — one artifact, a complete model, at the end.

The corpus blocks are RUN/data/pretrain/{train,eval}.jsonl when `tailor data build` wrote them
(data.pretrain_block_tokens), else cut from RUN/corpus.jsonl here by the same code (data/pretrain.py) with this
method's block options; whole documents are held out for the eval loss. The weights that train are LoRA adapters
(folded into the saved model) or all of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.artifacts import save_whole_model
from tailor.methods.lora import UsesLora
from tailor.methods.lora import prepare as add_lora
from tailor.methods.registry import Method, Phase, TrainContext, register

KEY = "methods.continued_pretraining"
CORPUS_FILE = "corpus.jsonl"


class ContinuedPretrainingOptions(UsesLora):
    weights: Literal["lora", "full"] = Field("lora", description=(
        "Which weights train: LoRA adapters on the projections (cheap; folded into the saved model) or all."))
    block_tokens: int = Field(512, gt=8, description=(
        "Tokens per training block cut from the corpus; at most the model's context (when RUN/data/pretrain/ is "
        "absent; else data.pretrain_block_tokens made the blocks)."))
    overlap_tokens: int = Field(64, ge=0, description=(
        "Tokens a block shares with the previous one of the same document, as context only (no loss twice)."))
    eval_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Share of corpus documents held out for the eval loss (when RUN/data/pretrain/ is absent)."))
    corpus_steps: int = Field(0, ge=0, description=(
        "Optimizer steps on the corpus; 0: as train.max_steps / train.epochs."))
    then_sft: bool = Field(False, description=(
        "Continue with SFT on RUN/data/train.jsonl after the corpus (domain adaptation, then instruction tuning)."))


def model_context(ref: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(ref), "max_position_embeddings", None)


def check_block(options, context: int | None, key: str) -> None:
    if context is not None and options.block_tokens > context:
        raise TailorError(f"{key}.block_tokens: {options.block_tokens} tokens do not fit the model's context of "
                          f"{context} tokens")
    if options.overlap_tokens >= options.block_tokens:
        raise TailorError(f"{key}.overlap_tokens: must be below block_tokens={options.block_tokens} "
                          f"(found {options.overlap_tokens})")


def corpus_phase(ctx: TrainContext, tokenizer, options, key: str, context: int | None,
                 name: str = "corpus") -> Phase:
    """Blocks from RUN/data/pretrain/ (`tailor data build`), or cut from RUN/corpus.jsonl with `options`."""
    from tailor.data.pretrain import PRETRAIN_DIR, block_examples, build_pretrain_blocks, read_blocks

    folder = ctx.run_dir / "data" / PRETRAIN_DIR
    if (folder / "train.jsonl").is_file():
        train_blocks = read_blocks(folder / "train.jsonl")
        eval_blocks = read_blocks(folder / "eval.jsonl") if (folder / "eval.jsonl").is_file() else []
    else:
        check_block(options, context, key)
        train_blocks, eval_blocks = build_pretrain_blocks(
            ctx.run_dir / CORPUS_FILE, tokenizer, block_tokens=options.block_tokens,
            overlap_tokens=options.overlap_tokens, eval_fraction=options.eval_fraction, seed=ctx.config.data.seed)
    train_examples, eval_examples = block_examples(train_blocks, tokenizer), block_examples(eval_blocks, tokenizer)
    # blocks read from RUN/data/pretrain/ were cut with the base model's tokenizer (from_scratch trains its own)
    longest = max((len(e.input_ids) for e in train_examples + eval_examples), default=0)
    if context is not None and longest > context:
        raise TailorError(f"{folder / 'train.jsonl'}: a block of {longest} tokens does not fit the model's context "
                          f"of {context} tokens; rebuild with a smaller data.pretrain_block_tokens")
    return Phase(name, train_examples, eval_examples, max_steps=options.corpus_steps or None)


def phases(ctx: TrainContext, tokenizer) -> list[Phase]:
    """Corpus blocks (loss on every token), then the chat records when then_sft."""
    from tailor.train.run import sft_phase

    options = ctx.options
    found = [corpus_phase(ctx, tokenizer, options, KEY, model_context(ctx.base_ref))]
    if options.then_sft:
        found.append(sft_phase(ctx.run_dir, tokenizer))
    return found


def prepare_weights(model, options, key: str):
    """LoRA adapters as `options.lora` says, or every weight trainable."""
    if options.weights == "full":
        return model.requires_grad_(True)
    return add_lora(model, options.lora, f"{key}.lora")


def prepare(model, options: ContinuedPretrainingOptions):
    return prepare_weights(model, options, KEY)


register(Method(name="continued_pretraining", options=ContinuedPretrainingOptions, prepare=prepare,
                artifact="model", save=save_whole_model, phases=phases,
                frozen_base=lambda options: options.weights == "lora",
                summary="Causal-LM training on the corpus (LoRA or full), optionally then SFT; saves a whole "
                        "model."))
