"""`tailor data inspect FILE`: what a dataset holds before a model trains on it.

Counts, token-length statistics with a histogram, role and label distributions, and a loss-mask preview: the
tokens the loss is computed on, exactly as the training core (train/examples.py `tokenize_chat`) marks them, so a
wrong chat template or a missing assistant turn shows before a run is spent on it. The HTML page is one
self-contained file (the plot is an embedded PNG), so it opens offline and can be attached to a review.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError

PREVIEW_RECORDS = 3


@dataclass
class MaskedToken:
    text: str
    trained: bool


@dataclass
class Inspection:
    path: str
    kind: str  # chat, qa, classification, text
    records: int = 0
    token_lengths: list[int] = field(default_factory=list)
    roles: Counter = field(default_factory=Counter)  # messages per role
    turns: Counter = field(default_factory=Counter)  # conversations by number of messages
    labels: Counter = field(default_factory=Counter)
    trained_tokens: int = 0  # tokens with a loss (assistant turns), over all chat records
    previews: list[list[MaskedToken]] = field(default_factory=list)

    def length_stats(self) -> dict:
        lengths = sorted(self.token_lengths)
        if not lengths:
            return {}
        at = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
        return {"min": lengths[0], "mean": round(statistics.fmean(lengths), 1), "median": at(0.5), "p90": at(0.9),
                "p99": at(0.99), "max": lengths[-1], "total": sum(lengths)}

    def to_dict(self) -> dict:
        total = sum(self.token_lengths)
        return {"path": self.path, "kind": self.kind, "records": self.records, "tokens": self.length_stats(),
                "roles": dict(self.roles), "messages_per_record": {str(k): v for k, v in sorted(self.turns.items())},
                "labels": dict(self.labels.most_common()),
                "trained_token_share": round(self.trained_tokens / total, 3) if total and self.kind == "chat"
                else None}


def _records(path: Path):
    from tailor.data.formats import _records

    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise TailorError(f"{path}: cannot inspect '{path.suffix}' files (use .jsonl, .json, .csv or .tsv)")
    return _records(path)


def inspect_file(path: Path | str, tokenizer, *, preview: int = PREVIEW_RECORDS) -> Inspection:
    """Read every record; a record that is not usable raises naming `file:line` (run `tailor data validate`)."""
    from tailor.data.formats import ANSWER_KEYS, QUESTION_KEYS, to_messages
    from tailor.train.examples import IGNORE, tokenize_chat

    path = Path(path)
    inspection: Inspection | None = None
    for line, record in _records(path):
        where = f"{path}:{line}"
        if inspection is None:
            kind = ("classification" if "label" in record and "messages" not in record else
                    "text" if "text" in record and "messages" not in record else
                    "qa" if any(k in record for k in QUESTION_KEYS + ANSWER_KEYS) and "messages" not in record
                    else "chat")
            inspection = Inspection(str(path), kind)
        inspection.records += 1
        if inspection.kind == "classification":
            inspection.labels[str(record.get("label"))] += 1
        if inspection.kind in ("classification", "text"):
            text = record.get("text")
            if not isinstance(text, str):
                raise TailorError(f'{where}: no "text" string; run `tailor data validate {path}`')
            inspection.token_lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
            continue
        try:
            messages = to_messages(record, where)
        except TailorError as exc:
            raise TailorError(f"{exc}; run `tailor data validate {path}` for every problem") from None
        inspection.roles.update(m["role"] for m in messages)
        inspection.turns[len(messages)] += 1
        example = tokenize_chat(tokenizer, messages, where)
        inspection.token_lengths.append(len(example.input_ids))
        inspection.trained_tokens += sum(label != IGNORE for label in example.labels)
        if len(inspection.previews) < preview:
            inspection.previews.append([MaskedToken(tokenizer.decode([token]), label != IGNORE)
                                        for token, label in zip(example.input_ids, example.labels, strict=True)])
    if inspection is None:
        raise TailorError(f"{path}: no records")
    return inspection


def histogram_png(lengths: list[int], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    axes.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#3b6ea8")
    axes.set_xlabel("tokens per record")
    axes.set_ylabel("records")
    axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def render_html(inspection: Inspection) -> str:
    stats = inspection.length_stats()
    png = base64.b64encode(histogram_png(inspection.token_lengths, Path(inspection.path).name)).decode("ascii")
    esc = html.escape

    def table(title: str, rows: dict) -> str:
        if not rows:
            return ""
        body = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in rows.items())
        return f"<h2>{esc(title)}</h2><table>{body}</table>"

    previews = "".join(
        "<pre class='mask'>" + "".join(f"<span class='{'t' if token.trained else 'p'}'>{esc(token.text)}</span>"
                                       for token in tokens) + "</pre>" for tokens in inspection.previews)
    summary = inspection.to_dict()
    share = summary["trained_token_share"]
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(Path(inspection.path).name)} - tailor data inspect</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:.2rem .6rem}}
pre.mask{{white-space:pre-wrap;border:1px solid #ddd;padding:.5rem}}.t{{background:#c8f0c8}}.p{{color:#777}}</style>
</head><body>
<h1>{esc(inspection.path)}</h1>
<p>{inspection.records} records ({esc(inspection.kind)}){f"; {share:.0%} of tokens are trained on" if share else ""}</p>
{table("Tokens per record", stats)}
<img alt="token length histogram" src="data:image/png;base64,{png}">
{table("Messages by role", dict(inspection.roles))}
{table("Messages per record", summary["messages_per_record"])}
{table("Labels", dict(inspection.labels.most_common()))}
{"<h2>Loss mask</h2><p>Highlighted tokens are trained on; grey ones are context only.</p>" + previews
 if previews else ""}
</body></html>
"""
