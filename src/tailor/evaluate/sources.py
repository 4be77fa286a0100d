"""The models an evaluation compares: the base model, any run's customized model, an exported model folder, or a
remote OpenAI-compatible endpoint, each behind the same small interface.

`eval.models` names them ({name: what}); every value is checked (folders exist and hold a model, endpoints answer
and serve the named model) before any model loads, so a typo costs a second, not an evaluation. Local models are
loaded one at a time (`open_model`) and released before the next.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.evaluate.generate import greedy_answers
from tailor.train.examples import IGNORE, collate, tokenize_chat
from tailor.train.loop import autocast, evaluate_loss

ENDPOINT_PREFIX = "endpoint:"
ENDPOINT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate. kind: base | run | export | endpoint; `target`: the folder or the URL."""

    name: str
    kind: str
    target: str = ""
    remote_model: str = ""  # endpoint: the model name the server knows
    where: str = ""  # the config key, for messages

    @property
    def has_likelihood(self) -> bool:
        # label and option choice read token probabilities, which a chat endpoint does not return reliably
        return self.kind != "endpoint"


def run_has_artifact(config: TailorConfig, run_dir: Path) -> bool:
    from tailor.methods.artifacts import artifact_dir, run_method
    from tailor.methods.kinds import get_kind

    method = run_method(config, run_dir)
    return get_kind(method.artifact).holds(artifact_dir(run_dir, method))


def default_specs(config: TailorConfig, run_dir: Path) -> list[ModelSpec]:
    """Today's comparison: the base model and, once the run has one, its customized model."""
    from tailor.methods.artifacts import trained_method

    specs = [ModelSpec("base", "base", where="eval.models")]
    if run_has_artifact(config, run_dir):
        specs.append(ModelSpec(trained_method(config, run_dir), "run", str(run_dir), where="eval.models"))
    return specs


def parse_spec(name: str, value: str, *, root: Path, run_dir: Path, where: str) -> ModelSpec:
    """`base`, `run`, a run folder, an exported model folder or `endpoint:URL#MODEL` → a checked ModelSpec."""
    value = value.strip()
    if value == "base":
        return ModelSpec(name, "base", where=where)
    if value == "run":
        return ModelSpec(name, "run", str(run_dir), where=where)
    if value.startswith(ENDPOINT_PREFIX):
        url, _, remote = value[len(ENDPOINT_PREFIX):].partition("#")
        if not url.startswith(("http://", "https://")) or not remote:
            raise TailorError(f"{where}: '{value}': expected endpoint:URL#MODEL, e.g. "
                              f"endpoint:http://127.0.0.1:8000/v1#lora")
        return ModelSpec(name, "endpoint", url.rstrip("/"), remote, where=where)
    folder = Path(value).expanduser()
    folder = folder if folder.is_absolute() else Path(root) / folder
    if not folder.is_dir():
        raise TailorError(f"{where}: {folder} does not exist (expected base, run, a run folder, an exported model "
                          f"folder or endpoint:URL#MODEL)")
    from tailor.methods.kinds import MODEL, run_folders

    if MODEL.holds(folder):
        return ModelSpec(name, "export", str(folder), where=where)
    if any((folder / sub).is_dir() for sub in run_folders()) or (folder / "manifest.json").is_file():
        return ModelSpec(name, "run", str(folder), where=where)
    raise TailorError(f"{where}: {folder} is neither a run folder ({', '.join(f + '/' for f in run_folders())}) "
                      f"nor an exported model folder ({MODEL.marker})")


def resolve_specs(config: TailorConfig, root: Path, run_dir: Path) -> list[ModelSpec]:
    if not config.eval.models:
        return default_specs(config, run_dir)
    return [parse_spec(name, value, root=root, run_dir=run_dir, where=f"eval.models.{name}")
            for name, value in config.eval.models.items()]


def _client(spec: ModelSpec):
    from openai import OpenAI

    # tailor serve takes any key; a hosted endpoint reads the usual variable
    return OpenAI(base_url=spec.target, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                  timeout=ENDPOINT_TIMEOUT_S, max_retries=1)


def check_endpoint(spec: ModelSpec) -> None:
    """Reachable, and serving the named model: asked before any local model loads."""
    import openai

    try:
        served = [model.id for model in _client(spec).models.list()]
    except openai.APIConnectionError as exc:
        raise TailorError(f"{spec.where}: cannot reach {spec.target} ({exc.__cause__ or exc})") from None
    except openai.APIError as exc:
        raise TailorError(f"{spec.where}: {spec.target} answered GET /models with an error ({exc})") from None
    if spec.remote_model not in served:
        raise TailorError(f"{spec.where}: {spec.target} does not serve '{spec.remote_model}' "
                          f"(it serves: {', '.join(served) or 'nothing'})")


class LocalModel:
    """A model in this process; `transform` rewrites conversations (the `prompt` method's few-shot profile)."""

    has_likelihood = True

    def __init__(self, name: str, model, tokenizer, dtype: torch.dtype, transform: Callable | None = None,
                 grounding=None):
        self.name, self.model, self.tokenizer, self.dtype = name, model, tokenizer, dtype
        self.transform = transform or (lambda messages: messages)
        self.grounding = grounding  # retrieval.Grounding: questions are answered from retrieved passages

    def answers(self, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int,
                on_batch=None) -> list[str]:
        return greedy_answers(self.model, self.tokenizer, [self.transform(c) for c in conversations],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, compute_dtype=self.dtype,
                              on_batch=on_batch)

    def answer_loss(self, pairs: list[tuple[list[dict], str]], *, batch_size: int) -> float:
        """Mean cross-entropy per reference-answer token; earlier turns a profile adds are context only."""
        examples = [tokenize_chat(self.tokenizer, [*self.transform(conv), {"role": "assistant", "content": ref}],
                                  last_turn_only=True) for conv, ref in pairs]
        return evaluate_loss(self.model, examples, batch_size=batch_size, pad_id=self.tokenizer.pad_token_id,
                             compute_dtype=self.dtype)

    @torch.no_grad()
    def option_logprobs(self, conversations: list[list[dict]], options: list[str] | list[list[str]], *,
                        batch_size: int) -> list[list[float]]:
        """log P(option is the whole answer | conversation), summed over the option's tokens (its end-of-turn
        included, so a label cannot win by being a prefix of a longer answer). `options`: one list for every
        conversation, or a list per conversation. Returns [conversations][options]."""
        per_conversation = options if options and isinstance(options[0], list) else [options] * len(conversations)
        pairs = [(i, option) for i, choices in enumerate(per_conversation) for option in choices]
        examples = [tokenize_chat(self.tokenizer, [*self.transform(conversations[i]),
                                                   {"role": "assistant", "content": option}], last_turn_only=True)
                    for i, option in pairs]
        scores = [0.0] * len(examples)
        device = next(self.model.parameters()).device
        self.model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([examples[i] for i in rows], self.tokenizer.pad_token_id, device)
            with autocast(self.model, self.dtype):
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # prompt-learning methods prepend virtual tokens: keep the input's own positions
            logits = logits[:, -batch["input_ids"].shape[1]:]  # [B, T, V]
            labels = batch["labels"][:, 1:]  # [B, T-1]
            mask = labels != IGNORE
            # the softmax only where an option token is predicted: [option tokens, V], not [B, T, V]
            picked = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1))
            sums = torch.zeros(len(rows)).index_add_(0, mask.nonzero()[:, 0].cpu(), picked.squeeze(-1).cpu())
            for row, index in enumerate(rows):
                scores[index] = float(sums[row])
        result, position = [], 0
        for choices in per_conversation:
            result.append(scores[position:position + len(choices)])
            position += len(choices)
        return result


class EndpointModel:
    """An OpenAI-compatible server (another tailor serve, vLLM, a hosted API): answers only, greedy."""

    has_likelihood = False
    grounding = None  # a grounded endpoint retrieves on its own side

    def __init__(self, spec: ModelSpec):
        self.name, self.spec, self.client = spec.name, spec, _client(spec)

    def answers(self, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int = 1,
                on_batch=None) -> list[str]:
        import openai

        answers = []
        for conversation in conversations:
            try:
                reply = self.client.chat.completions.create(model=self.spec.remote_model, messages=conversation,
                                                            max_tokens=max_new_tokens, temperature=0.0)
            except openai.APIError as exc:
                raise TailorError(f"{self.spec.where}: {self.spec.target} failed during the evaluation "
                                  f"({exc})") from None
            answers.append((reply.choices[0].message.content or "").strip())
            if on_batch is not None:
                on_batch(1)
        return answers


@contextlib.contextmanager
def open_model(spec: ModelSpec, config: TailorConfig, base_ref: str, dtype: torch.dtype) -> Iterator:
    """The model named by `spec`, loaded for the block and released after it."""
    from tailor.methods.artifacts import load_for_inference
    from tailor.models.base import load_model, load_tokenizer

    if spec.kind == "endpoint":
        yield EndpointModel(spec)
        return
    if spec.kind == "base":
        yield LocalModel(spec.name, load_model(base_ref, dtype=dtype).eval(), load_tokenizer(base_ref), dtype)
        return
    if spec.kind == "export":
        folder = Path(spec.target)
        if (folder / "model.int8.pt").is_file():
            from tailor.models.export import load_int8

            model, model_dtype = load_int8(folder), torch.float32  # dynamic int8 kernels take fp32 activations
        else:
            model, model_dtype = load_model(str(folder), dtype=dtype).eval(), dtype
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        yield LocalModel(spec.name, model, load_tokenizer(str(folder) if has_tokenizer else base_ref), model_dtype)
        return
    run_dir = Path(spec.target)
    # every model here is read with its own tokenizer (from_scratch trains one with another vocabulary)
    models = load_for_inference(config, run_dir, base_ref, dtype, own_tokenizers=True)
    if not models.has_artifact:
        raise TailorError(f"{spec.where}: {run_dir} has no trained {models.method} artifact; run `tailor train`")
    tokenizer = models.tokenizer_for(models.method, load_tokenizer(base_ref))
    with models.use(models.method) as model:
        yield LocalModel(spec.name, model, tokenizer, dtype,
                         transform=lambda messages: models.messages_for(models.method, messages),
                         grounding=models.grounding)
