"""Distillation: a student learns from a teacher's token distributions (KL at the answer positions, softened by a
temperature; Hinton et al., 2015) and/or from the teacher's own answers (sequence-level distillation; Kim & Rush,
2016), generated greedily once and cached in the run folder.

The teacher is any model tailor loads: a model folder, the bundled default, a hub id the user names, or a trained
run folder (its adapter on its base, or its whole model). The student is a smaller model the user names (trained in
full) or the base with LoRA; the artifact is always a complete model (RUN/model), LoRA folded in.
KL compares distributions token by token, so it needs one vocabulary for both; that is checked before training.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from tailor.errors import TailorError
from tailor.methods.artifacts import save_whole_model
from tailor.methods.kinds import ADAPTER, MODEL
from tailor.methods.lora import UsesLora
from tailor.methods.lora import prepare as add_lora
from tailor.methods.registry import Method, Phase, TrainContext, register
from tailor.train.examples import IGNORE

KEY = "methods.distill"
ANSWERS_FILE = Path("distill") / "teacher_answers.jsonl"


class DistillOptions(UsesLora):
    teacher: str | None = Field(None, description=(
        "Teacher: a model folder, the bundled default (smollm2-135m-instruct), a hub id, or a trained run folder "
        "(its adapter/ on its base, or its model/); null: the base model."))
    student: str | None = Field(None, description=(
        "Student: a (smaller) model folder sharing the teacher's vocabulary, trained in full; null: the base model "
        "with LoRA adapters."))
    kl_weight: float = Field(0.5, ge=0, le=1, description=(
        "Share of the loss that is KL(teacher || student) at the answer tokens; the rest is cross-entropy on the "
        "answers. 0: learn only from the teacher's answers (any vocabulary)."))
    temperature: float = Field(2.0, gt=0, description=(
        "Softens both distributions before the KL (higher: more weight on the teacher's runner-up tokens); the KL "
        "is scaled by temperature² so its gradients keep their size."))
    answers: Literal["teacher", "reference"] = Field("teacher", description=(
        "Answers the student is trained on: the teacher's greedy answers to the training questions (generated once, "
        "cached in RUN/distill/) or the reference answers of RUN/data/train.jsonl."))
    max_new_tokens: int = Field(64, gt=0, description="Longest teacher answer generated.")

    @model_validator(mode="after")
    def _has_teacher_signal(self) -> DistillOptions:
        if self.kl_weight == 0 and self.answers == "reference":
            raise ValueError("kl_weight 0 with answers 'reference' learns nothing from the teacher; "
                             "set kl_weight > 0 or answers: teacher")
        return self


def _student_ref(options: DistillOptions, base_ref: str) -> str:
    from tailor.models.base import resolve_base_model

    return resolve_base_model(options.student) if options.student else base_ref


def tokenizer(ctx: TrainContext):
    from tailor.models.base import load_tokenizer

    return load_tokenizer(_student_ref(ctx.options, ctx.base_ref))


def create(base_ref: str, dtype, options: DistillOptions):
    from tailor.models.base import load_model

    return load_model(_student_ref(options, base_ref), dtype=dtype)


def prepare(model, options: DistillOptions):
    """A named student trains in full; the base trains LoRA adapters."""
    if options.student:
        return model.requires_grad_(True)
    return add_lora(model, options.lora, f"{KEY}.lora")


def load_teacher(ref: str, root: Path, dtype: torch.dtype):
    """(model in eval mode, tokenizer, description) for any model tailor loads, including a trained run folder."""
    from tailor.models.base import load_model, load_tokenizer, resolve_base_model
    from tailor.workspace import read_json

    path = Path(ref).expanduser()
    if not path.is_absolute() and (Path(root) / path).exists():
        path = Path(root) / path
    if path.is_dir() and not MODEL.holds(path):  # a run folder
        if MODEL.holds(MODEL.in_run(path)):
            folder = str(MODEL.in_run(path))
            return load_model(folder, dtype=dtype).eval(), load_tokenizer(folder), folder
        adapter = ADAPTER.in_run(path)
        if ADAPTER.holds(adapter):
            import peft

            manifest = path / "manifest.json"
            trained = read_json(manifest).get("stages", {}).get("train", {}) if manifest.is_file() else {}
            base = trained.get("base_model") or peft.PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
            if not base:  # peft types it Optional (0.22): an adapter saved without its base names none
                raise TailorError(f"{KEY}.teacher: {adapter} does not name its base model (base_model_name_or_path "
                                  f"in adapter_config.json)")
            model = peft.PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter)).eval()
            if not model.peft_config[model.active_adapter].is_prompt_learning:
                model = model.merge_and_unload()  # one plain model: faster, and the same outputs
            return model, load_tokenizer(base), str(adapter)
        raise TailorError(f"{KEY}.teacher: {path} is neither a model folder (config.json) nor a trained run "
                          f"folder (adapter/ or model/)")
    resolved = resolve_base_model(ref, root=root)
    return load_model(resolved, dtype=dtype).eval(), load_tokenizer(resolved), resolved


def check_shared_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name: str) -> None:
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise TailorError(f"{KEY}.teacher: the teacher ({teacher_name}, {len(teacher_vocab)} tokens) and the student "
                          f"({len(student_vocab)} tokens) do not share one vocabulary ({differing} token ids differ); "
                          f"KL needs the same tokens on both sides. Pick a student of the teacher's family, or set "
                          f"{KEY}.kl_weight: 0 to learn from the teacher's answers only")


def answer_logits(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Logits predicting each label token, [label tokens, vocabulary], in fp32; only those positions go through
    the output projection when the model has no virtual tokens."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, -batch["input_ids"].shape[1]:][:, :-1][mask].float()  # virtual positions dropped
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return base.get_output_embeddings()(hidden[:, :-1][mask]).float()


def distillation_loss(teacher, *, kl_weight: float, temperature: float, vocab: int, compute_dtype: torch.dtype):
    """loss_fn for the training core: kl_weight · T² · KL(teacher_T || student_T) + (1 − kl_weight) · CE, summed
    over the answer tokens."""
    from tailor.train.loop import autocast

    def loss(model, batch):
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE  # [B, T-1]
        student = answer_logits(model, batch, mask)  # [N, V]
        total = torch.zeros((), device=student.device)
        if kl_weight < 1:
            total = (1 - kl_weight) * torch.nn.functional.cross_entropy(student, labels[mask], reduction="sum")
        if kl_weight > 0:
            with torch.no_grad(), autocast(teacher, compute_dtype):
                target = answer_logits(teacher, batch, mask)
            # embedding matrices may be padded past the tokenizer's vocabulary: compare the real tokens only
            student_log = torch.log_softmax(student[:, :vocab] / temperature, dim=-1)
            teacher_log = torch.log_softmax(target[:, :vocab] / temperature, dim=-1)
            kl = torch.nn.functional.kl_div(student_log, teacher_log, log_target=True, reduction="sum")
            total = total + kl_weight * temperature ** 2 * kl
        return total, int(mask.sum())

    return loss


def teacher_answers(teacher, teacher_tokenizer, teacher_name: str, conversations: list[list[dict]],
                    cache: Path, *, max_new_tokens: int, batch_size: int, compute_dtype) -> list[str]:
    """Greedy teacher answers to the questions, generated once: cached by teacher, length and conversation."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tailor.evaluate.generate import greedy_answers
    from tailor.workspace import read_jsonl, write_jsonl

    def key(conversation):
        return hashlib.sha256(json.dumps([teacher_name, max_new_tokens, conversation]).encode()).hexdigest()

    keys = [key(c) for c in conversations]
    cached = {r["key"]: r["answer"] for _, r in read_jsonl(cache)} if cache.is_file() else {}
    missing = [i for i, k in enumerate(keys) if k not in cached]
    if missing:
        with Progress(TextColumn("[bold]teacher answers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(file=sys.stderr), transient=True) as progress:
            task = progress.add_task("teacher", total=len(missing))
            answers = greedy_answers(teacher, teacher_tokenizer, [conversations[i] for i in missing],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     compute_dtype=compute_dtype, on_batch=lambda n: progress.advance(task, n))
        cached.update({keys[i]: answer for i, answer in zip(missing, answers, strict=True)})
        write_jsonl(cache, [{"key": k, "answer": cached[k]} for k in keys])
    return [cached[k] for k in keys]


def phases(ctx: TrainContext, student_tokenizer) -> list[Phase]:
    """The training chat records (answers from the teacher or the references) with the distillation loss."""
    from tailor.train.examples import tokenize_chat
    from tailor.train.run import sft_phase
    from tailor.workspace import read_jsonl

    options = ctx.options
    chat = sft_phase(ctx.run_dir, student_tokenizer)  # checks the data files before the teacher loads
    if options.student is None:  # LoRA targets checked on a weightless copy: before minutes of teacher answers
        from transformers import AutoConfig, AutoModelForCausalLM

        from tailor.methods.registry import require_modules

        with torch.device("meta"):
            shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ctx.base_ref))
        require_modules(shape, options.lora.targets, f"{KEY}.lora.targets")
    teacher, teacher_tokenizer, teacher_name = load_teacher(options.teacher or ctx.base_ref, ctx.root,
                                                            ctx.compute_dtype)
    if options.kl_weight > 0:
        check_shared_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name)
    if options.answers == "teacher":
        train_path = ctx.run_dir / "data" / "train.jsonl"
        records = [(f"{train_path}:{n}", r["messages"]) for n, r in read_jsonl(train_path)]
        prompts = [messages[:-1] if messages[-1]["role"] == "assistant" else messages for _, messages in records]
        answers = teacher_answers(teacher, teacher_tokenizer, teacher_name, prompts, ctx.run_dir / ANSWERS_FILE,
                                  max_new_tokens=options.max_new_tokens, batch_size=ctx.config.eval.batch_size,
                                  compute_dtype=ctx.compute_dtype)
        # a teacher that says nothing teaches nothing: that record keeps its reference answer
        chat.train_examples = [
            tokenize_chat(student_tokenizer, [*prompt, {"role": "assistant", "content": answer}], where=where)
            if answer.strip() else example
            for (where, _), prompt, answer, example in zip(records, prompts, answers, chat.train_examples, strict=True)]
    if options.kl_weight == 0:
        del teacher  # answers only: the teacher is not needed while the student trains
        return [Phase("distill", chat.train_examples, chat.eval_examples)]
    loss_fn = distillation_loss(teacher, kl_weight=options.kl_weight, temperature=options.temperature,
                                vocab=len(student_tokenizer), compute_dtype=ctx.compute_dtype)
    return [Phase("distill", chat.train_examples, chat.eval_examples, loss_fn=loss_fn)]


register(Method(name="distill", options=DistillOptions, prepare=prepare, create=create, tokenizer=tokenizer,
                phases=phases, artifact="model", save=save_whole_model,
                frozen_base=lambda options: options.student is None,
                summary="A student (a smaller model, or the base with LoRA) learns the teacher's token "
                        "distributions (KL) and/or its generated answers; saves a whole model."))
