"""Grounded conversations and their checks: passages put into the prompt as quoted data, the sources an answer
cites, whether it abstained, how much of it the passages support, and which chunks hold a reference answer.

Retrieved text is data, never instructions: it goes into the user's turn between delimiters it cannot close (the
delimiter and chat-template control tokens are removed from it), and the system message says so. Citations are
attributed after the answer is written (the passages holding most of its content words), so a small model that
never writes "[1]" still returns correct sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tailor.config import RetrievalConfig
from tailor.errors import TailorError
from tailor.evaluate.metrics import normalize_answer
from tailor.retrieval.index import words
from tailor.retrieval.search import Retrieval, Retriever

DELIMITER = '"""'
# chat-template control tokens of the common families (ChatML, Llama 3, Llama 2/Mistral, Gemma, Phi)
_CONTROL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>|<\|?endoftext\|?>")
_ABSTAIN = re.compile(r"\b(documents?|passages?|sources?)\s+(do|does)\s+not\s+(say|mention|contain|state|specify)\b"
                      r"|\bnot\s+(in|mentioned in|covered by)\s+the\s+(documents?|passages?)\b"
                      r"|\bi\s+(do\s+not|don't)\s+know\b", re.I)
RETRIEVAL_FILE = "retrieval.json"  # in a customization folder: serve and evaluate it with retrieval


def quote(text: str) -> str:
    """Passage text that cannot end its quotation or open a chat turn of its own."""
    return _CONTROL.sub(" ", text).replace(DELIMITER, '"')


def passages_block(retrieval: Retrieval) -> str:
    parts = []
    for passage in retrieval.passages:
        where = Path(passage.source).name if not passage.url else passage.url
        page = f", page {passage.page}" if passage.page else ""
        title = f"{passage.title} " if passage.title else ""
        parts.append(f"[{passage.rank}] {title}({where}{page})\n{DELIMITER}\n{quote(passage.text)}\n{DELIMITER}")
    return "\n".join(parts)


def grounded_messages(messages: list[dict], retrieval: Retrieval, settings: RetrievalConfig,
                      system_prompt: str = "") -> list[dict]:
    """The conversation with the passages quoted in its last user turn and the grounding rule in the system
    message (added after the conversation's own system message, or after `system_prompt` when it has none)."""
    rule = settings.instruction.replace("{abstain}", settings.abstain_answer)
    turns = [dict(m) for m in messages]
    if turns and turns[0]["role"] == "system":
        turns[0]["content"] = f"{turns[0]['content']}\n{rule}"
    else:
        turns.insert(0, {"role": "system", "content": f"{system_prompt}\n{rule}".strip()})
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    turns[last_user]["content"] = (f"Passages:\n{passages_block(retrieval)}\n\n"
                                   f"Question: {turns[last_user]['content']}")
    return turns


def last_question(messages: list[dict]) -> str | None:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


def is_abstention(answer: str, abstain_answer: str) -> bool:
    target = normalize_answer(abstain_answer)
    return bool(target and target in normalize_answer(answer)) or bool(_ABSTAIN.search(answer))


def support(answer: str, text: str, weight=None) -> float:
    """Share of the answer's content words found in `text` (0 for an answer without content words); with
    `weight` (a word's IDF), rare words count more: "400 Linden Avenue" outweighs "city hall"."""
    answer_words = set(words(answer))
    if not answer_words:
        return 0.0
    weight = weight or (lambda word: 1.0)
    total = sum(weight(w) for w in answer_words)
    return sum(weight(w) for w in answer_words & set(words(text))) / total if total > 0 else 0.0


def faithfulness(answer: str, retrieval: Retrieval) -> float:
    """Share of the answer's content words that the retrieved passages hold: a proxy for answering from them."""
    return support(answer, " ".join(p.text for p in retrieval.passages))


# a lower-ranked passage is cited first only when it holds this much more of the answer's content words than the
# best-ranked one: a small reader's words are weak evidence (benchmarks/grounded.py: citing by support alone put
# the right document first for 72% of city answers, by rank 93%, with this margin 90%)
CITE_MARGIN = 0.5


def cite(answer: str, retrieval: Retrieval, min_support: float, abstain_answer: str, weight=None) -> list[dict]:
    """The sources of an answer: the best-ranked passage (or one holding far more of the answer, CITE_MARGIN),
    then the other passages holding at least `min_support` of its content words, most supportive first; nothing
    for an abstention."""
    if not retrieval.passages or retrieval.abstain or is_abstention(answer, abstain_answer):
        return []
    scored = [(support(answer, p.text, weight), p) for p in retrieval.passages]
    first = max(scored, key=lambda item: item[0])
    if first[0] - scored[0][0] < CITE_MARGIN:
        first = scored[0]
    rest = sorted([(s, p) for s, p in scored if s >= min_support and p is not first[1]],
                  key=lambda item: (-item[0], item[1].rank))
    cited, seen = [], set()
    for s, p in [first, *rest]:
        if (p.source, p.page) not in seen:  # two chunks of one page are one source to a reader
            seen.add((p.source, p.page))
            cited.append(p.citation(support=s))
    return cited


def same_source(source: str, gold: str) -> bool:
    """`gold` names a document by path or path suffix ("user-manual/config.html"), or by URL."""
    source, gold = source.replace("\\", "/"), gold.replace("\\", "/").lstrip("./")
    return source == gold or source.endswith("/" + gold)


@dataclass
class Gold:
    chunks: set[str]  # chunk ids that hold the answer (empty: unknown)
    sources: set[str]  # their documents


def gold_chunks(retriever: Retriever, reference: str, gold_source: str | None = None) -> Gold:
    """The chunks holding a reference answer: among the chunks of `gold_source` (all chunks when not given),
    those holding the most of the reference's rarer words (IDF-weighted), at least half of them. With a source
    but no such chunk, every chunk of the source counts (document-level)."""
    index = retriever.index
    candidates = [i for i, c in enumerate(index.chunks)
                  if gold_source is None or same_source(c["source"], gold_source)]
    if not candidates:  # the source is not indexed (e.g. dropped as a duplicate of another page): by content
        candidates, gold_source = list(range(len(index.chunks))), None
    reference_words = set(words(reference))
    total = sum(index.idf(w) for w in reference_words)
    scored = []
    for position in candidates:
        held = reference_words & index.chunk_words[position]
        scored.append((sum(index.idf(w) for w in held) / total if total else 0.0, index.chunks[position]))
    best = max((s for s, _ in scored), default=0.0)
    chosen = [c for s, c in scored if best >= 0.5 and s >= best - 0.05]
    if not chosen and gold_source is not None:
        chosen = [index.chunks[position] for position in candidates]
    return Gold({c["id"] for c in chosen}, {c["source"] for c in chosen})


def index_folder(config, root: Path, run_dir: Path) -> Path:
    """retrieval.index (relative to the workspace), else RUN/index."""
    if config.retrieval.index:
        folder = Path(config.retrieval.index).expanduser()
        return folder if folder.is_absolute() else Path(root) / folder
    return Path(run_dir) / "index"


def write_retrieval_file(folder: Path, config, root: Path, run_dir: Path) -> None:
    """Mark a customization folder as grounded: the retrieval settings and where its index is (relative to the
    folder, so a run folder can move). Stops when there is no index yet."""
    import os

    from tailor.retrieval.index import INDEX_FILE
    from tailor.workspace import write_json

    index = index_folder(config, root, run_dir).resolve()
    if not (index / INDEX_FILE).is_file():
        raise TailorError(f"retrieval: no index at {index}; run `tailor index` first (method rag and "
                          f"retrieval.enabled answer from it)")
    final = Path(run_dir).resolve() / Path(folder).name  # the temporary folder is renamed to this
    write_json(Path(folder) / RETRIEVAL_FILE, {
        "settings": config.retrieval.model_dump(mode="json"), "system_prompt": config.system_prompt,
        "index": os.path.relpath(index, final), "index_absolute": str(index)})


class Grounding:
    """A customization's retrieval: retrieve for a conversation, ground it, cite the answer."""

    def __init__(self, retriever: Retriever, system_prompt: str = ""):
        self.retriever, self.settings, self.system_prompt = retriever, retriever.settings, system_prompt

    @classmethod
    def load(cls, folder: Path, count_tokens=None) -> Grounding | None:
        """The grounding of a customization folder, None when it has no retrieval.json."""
        from tailor.workspace import read_json

        path = Path(folder) / RETRIEVAL_FILE
        if not path.is_file():
            return None
        data = read_json(path)
        index = (Path(folder) / data["index"]).resolve()
        if not index.is_dir():
            index = Path(data["index_absolute"])
        settings = RetrievalConfig.model_validate(data["settings"])
        return cls(Retriever(index, settings, count_tokens), data.get("system_prompt", ""))

    def retrieve(self, messages: list[dict]) -> Retrieval | None:
        question = last_question(messages)
        return None if question is None else self.retriever.retrieve(question)

    def ground(self, messages: list[dict], retrieval: Retrieval | None, *, force: bool = False) -> list[dict]:
        """The conversation with its passages quoted; unchanged when retrieval abstained (unless `force`: training
        prompts always carry what was retrieved)."""
        if retrieval is None or not retrieval.passages or (retrieval.abstain and not force):
            return messages
        return grounded_messages(messages, retrieval, self.settings, self.system_prompt)

    def cite(self, answer: str, retrieval: Retrieval | None) -> list[dict]:
        if retrieval is None:
            return []
        return cite(answer, retrieval, self.settings.min_support, self.settings.abstain_answer,
                    self.retriever.index.idf)
