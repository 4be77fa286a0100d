"""From scratch: a byte-level BPE tokenizer trained on the corpus and a small Llama-style model initialized at
random from a size preset, trained on the corpus blocks, then on the chat records.

The base model lends only its chat template and special tokens (kept first in the new vocabulary, in the same order),
so the chat format, the end-of-turn token and every stage that renders conversations work unchanged. The artifact is
a complete model folder with its own tokenizer (RUN/model); evaluation loads that tokenizer for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.continued_pretraining import CORPUS_FILE, corpus_phase
from tailor.methods.registry import Method, MethodOptions, Phase, TrainContext, register
from tailor.workspace import atomic_dir

KEY = "methods.from_scratch"
TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer: trained once, reused by --resume and later runs on the same corpus

# layers, width (hidden size), attention heads, key/value heads, MLP width
PRESETS = {"tiny": (2, 64, 4, 2, 256), "small": (4, 256, 4, 2, 768), "medium": (8, 512, 8, 4, 1536),
           "large": (12, 768, 12, 4, 2048)}


class FromScratchOptions(MethodOptions):
    size: Literal["tiny", "small", "medium", "large"] = Field("small", description=(
        "Model size preset (layers / width / heads / key-value heads / MLP width): tiny 2/64/4/2/256, "
        "small 4/256/4/2/768, medium 8/512/8/4/1536, large 12/768/12/4/2048."))
    vocab_size: int = Field(8192, ge=512, description=(
        "Vocabulary of the trained BPE tokenizer (the base model's special tokens included)."))
    context: int = Field(1024, gt=16, description="Longest sequence the model handles (position range).")
    block_tokens: int = Field(256, gt=8, description="Tokens per corpus training block; at most `context`.")
    overlap_tokens: int = Field(32, ge=0, description="Context tokens shared by consecutive blocks of a document.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of corpus chunks held out for the eval loss.")
    corpus_steps: int = Field(0, ge=0, description=(
        "Optimizer steps on the corpus before the chat records; 0: as train.max_steps / train.epochs."))


def special_tokens(base_tokenizer) -> list[str]:
    """The base tokenizer's special tokens in id order: the new vocabulary starts with them."""
    return [token.content for _, token in sorted(base_tokenizer.added_tokens_decoder.items()) if token.special]


def train_tokenizer(texts: list[str], base_tokenizer, vocab_size: int):
    """A byte-level BPE tokenizer (Hugging Face `tokenizers`) with the base's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(base_tokenizer)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    roles = {role: getattr(base_tokenizer, f"{role}_token") for role in ("bos", "eos", "unk", "pad")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **{f"{k}_token": v for k, v in roles.items() if v},
                                        model_max_length=base_tokenizer.model_max_length)
    tokenizer.chat_template = base_tokenizer.chat_template
    return tokenizer


def tokenizer_for_run(ctx: TrainContext):
    """Train the tokenizer on the corpus and the training chat records, or reuse RUN/tokenizer when it was trained
    on the same texts with the same options (BPE training is deterministic, but cheap to skip)."""
    from tailor.data.pretrain import documents_from_corpus
    from tailor.models.base import load_tokenizer
    from tailor.workspace import read_jsonl

    texts = [text for _, text in documents_from_corpus(ctx.run_dir / CORPUS_FILE)]
    train_path = ctx.run_dir / "data" / "train.jsonl"
    if train_path.is_file():
        texts += [m["content"] for _, record in read_jsonl(train_path) for m in record.get("messages", [])
                  if isinstance(m, dict) and isinstance(m.get("content"), str)]
    fingerprint = hashlib.sha256(json.dumps([ctx.options.vocab_size, ctx.base_ref, texts]).encode()).hexdigest()
    folder = ctx.run_dir / TOKENIZER_DIR
    stamp = folder / "trained_on.sha256"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return load_tokenizer(str(folder))
    base_tokenizer = load_tokenizer(ctx.base_ref)
    tokenizer = train_tokenizer(texts, base_tokenizer, ctx.options.vocab_size)
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "trained_on.sha256").write_text(fingerprint + "\n")
    return load_tokenizer(str(folder))


def create(base_ref: str, dtype, options: FromScratchOptions):
    """A Llama-style model of the preset's shape with random weights (seeded by the caller)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailor.models.base import device, load_tokenizer

    base_tokenizer = load_tokenizer(base_ref)
    specials = special_tokens(base_tokenizer)
    ids = {role: specials.index(token) if token in specials else None
           for role, token in (("bos", base_tokenizer.bos_token), ("eos", base_tokenizer.eos_token),
                               ("pad", base_tokenizer.pad_token))}
    layers, width, heads, kv_heads, mlp = PRESETS[options.size]
    config = LlamaConfig(vocab_size=options.vocab_size, hidden_size=width, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=options.context, tie_word_embeddings=True,
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    # ignored: transformers' decorator on PreTrainedModel.to is typed as if `self` were the first argument
    return LlamaForCausalLM(config).to(dtype=torch.float32, device=device())  # type: ignore[call-arg]


def prepare(model, options: FromScratchOptions):
    return model.requires_grad_(True)


def phases(ctx: TrainContext, tokenizer) -> list[Phase]:
    """The corpus blocks, then the chat records; both must fit the preset's context."""
    from tailor.train.run import sft_phase

    options = ctx.options
    if len(tokenizer) > options.vocab_size:  # cannot happen with a tokenizer trained here; a hand-made one could
        raise TailorError(f"{KEY}.vocab_size: the tokenizer has {len(tokenizer)} tokens, more than "
                          f"{options.vocab_size}")
    corpus = corpus_phase(ctx, tokenizer, options, KEY, options.context)
    chat = sft_phase(ctx.run_dir, tokenizer)
    longest = max(len(e.input_ids) for e in chat.train_examples + chat.eval_examples)
    if longest > options.context:
        raise TailorError(f"{KEY}.context: a chat record of {longest} tokens (with this tokenizer) does not fit the "
                          f"context of {options.context}; raise {KEY}.context or lower data.max_tokens")
    return [corpus, chat]




register(Method(name="from_scratch", options=FromScratchOptions, prepare=prepare, create=create, artifact="model",
                tokenizer=tokenizer_for_run, phases=phases,
                summary="A BPE tokenizer trained on the corpus and a small random Llama (size preset), trained on "
                        "the corpus then the chat records; saves a whole model with its tokenizer."))
