"""`tailor data inspect`: statistics, distributions, histogram and the loss mask the training core uses."""

from __future__ import annotations

import base64
import json
import re

import pytest
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.data.inspect import inspect_file, render_html
from tailor.errors import TailorError


@pytest.fixture
def tokenizer(tiny_model_dir):
    from tailor.models.base import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]})


def test_chat_statistics_and_loss_mask_cover_only_the_answer(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([chat("When is the pool open?", "From June to September."),
                               chat("Is parking free on Sundays downtown?", "Yes, all day.")]) + "\n")
    found = inspect_file(path, tokenizer, preview=1)
    summary = found.to_dict()
    assert found.kind == "chat" and found.records == 2 and summary["roles"] == {"system": 2, "user": 2,
                                                                                "assistant": 2}
    assert summary["messages_per_record"] == {"3": 2}
    assert summary["tokens"]["min"] < summary["tokens"]["max"] == max(found.token_lengths)
    (tokens,) = found.previews
    trained = "".join(t.text for t in tokens if t.trained)
    context = "".join(t.text for t in tokens if not t.trained)
    assert "From June to September." in trained and "When is the pool open?" in context
    assert "Be brief." not in trained and "pool" not in trained
    assert 0 < summary["trained_token_share"] < 0.5
    page = render_html(found)
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png).startswith(b"\x89PNG")
    assert "<span class='t'>" in page and "http" not in page.replace("http-equiv", "")  # self-contained


def test_labels_and_cli_writes_the_html(tmp_path, tiny_model_dir):
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join(json.dumps({"text": text, "label": label}) for text, label in
                              [("bill too high", "billing"), ("no power", "outage"), ("bill late", "billing")]))
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--tokenizer", tiny_model_dir,
                                      "-w", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 records (classification)" in result.output and "labels: billing 2, outage 1" in result.output
    page = (tmp_path / "intents.inspect.html").read_text()
    assert "<td>billing</td><td>2</td>" in page


def test_a_broken_record_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(chat("Hi?", "Hello.") + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(TailorError, match=r"bad\.jsonl:2: the conversation ends with a user turn.*data validate"):
        inspect_file(path, tokenizer)
