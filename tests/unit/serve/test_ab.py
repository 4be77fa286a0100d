"""A/B aliases: weighted, sticky splits, and `tailor ab report` with its significance tests."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from scipy import stats
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.errors import TailorError
from tailor.serve.ab import AliasRouter, report
from tailor.serve.feedback import FeedbackStore


def test_split_follows_the_weights_and_sticks_to_a_user():
    router = AliasRouter({"city-bot": {"lora": 3, "base": 1}}, ["base", "lora"])
    picks = {f"user-{i}": router.resolve("city-bot", f"user-{i}") for i in range(4000)}
    shares = Counter(model for model, _ in picks.values())
    assert abs(shares["lora"] / 4000 - 0.75) < 0.03
    assert all(router.resolve("city-bot", user) == pick for user, pick in list(picks.items())[:200])
    assert router.resolve("lora", "user-1") == ("lora", None)  # a plain model name is not an alias
    assert picks["user-1"][1] == "city-bot"


@pytest.mark.parametrize(("aliases", "message"), [
    ({"base": {"lora": 1}}, "serve.aliases.base: 'base' is already a model's name"),
    ({"bot": {"gpt": 1}}, "serve.aliases.bot.gpt: no such model"),
    ({"bot": {"lora": 0}}, "serve.aliases.bot.lora: the weight must be a positive number"),
    ({"bot": {}}, "serve.aliases.bot: needs at least one model"),
])
def test_bad_aliases_name_the_key(aliases, message):
    with pytest.raises(TailorError, match=message):
        AliasRouter(aliases, ["base", "lora"])


def fill(path, ratings: dict[str, tuple[int, int, int]]) -> None:
    """Per model: (completions, ups, downs) under alias city-bot."""
    store = FeedbackStore(path)
    for model, (completions, ups, downs) in ratings.items():
        for i in range(completions):
            response_id = f"{model}-{i}"
            store.record_completion(id=response_id, model=model, alias="city-bot", endpoint="chat",
                                    prompt=[{"role": "user", "content": "q"}], answer="a", user=f"u{i}",
                                    latency_ms=100.0 + i + (50 if model == "base" else 0), first_token_ms=10.0,
                                    completion_tokens=5)
            if i < ups + downs:
                store.add_feedback(response_id=response_id, rating="up" if i < ups else "down")
    store.close()


def test_report_gives_rates_latency_and_significance(tmp_path):
    fill(tmp_path / "feedback.db", {"lora": (120, 80, 20), "base": (60, 25, 25)})
    rows = report(tmp_path / "feedback.db")["city-bot"]
    control, other = rows
    assert control["model"] == "lora" and "vs" not in control  # the most-used version is the control
    assert (control["completions"], control["up"], control["down"]) == (120, 80, 20)
    assert control["up_rate"] == pytest.approx(0.8) and control["feedback_rate"] == pytest.approx(100 / 120)
    assert other["up_rate"] == pytest.approx(0.5) and other["vs"] == "lora"
    assert other["fisher_p"] == pytest.approx(stats.fisher_exact([[80, 20], [25, 25]]).pvalue)
    assert other["z_test_p"] < 0.001 and other["latency_p"] < 0.001
    assert control["latency_ms_p50"] == pytest.approx(160.0, abs=1)


def test_equal_versions_are_not_significant(tmp_path):
    fill(tmp_path / "feedback.db", {"lora": (40, 20, 10), "base": (40, 20, 10)})
    other = report(tmp_path / "feedback.db")["city-bot"][1]
    assert other["fisher_p"] == pytest.approx(1.0) and other["z_test_p"] == pytest.approx(1.0)


def test_ab_report_command(tmp_path):
    fill(tmp_path / "feedback.db", {"lora": (30, 20, 5), "base": (20, 5, 10)})
    runner = CliRunner()
    shown = runner.invoke(app, ["ab", "report", "--db", str(tmp_path / "feedback.db")], env={"COLUMNS": "160"})
    assert shown.exit_code == 0 and "alias city-bot" in shown.output and "lora (control)" in shown.output
    as_json = runner.invoke(app, ["ab", "report", "--db", str(tmp_path / "feedback.db"), "--json"])
    assert json.loads(as_json.output)["city-bot"][1]["up_rate"] == pytest.approx(1 / 3)
    missing = runner.invoke(app, ["ab", "report", "--db", str(tmp_path / "feedback.db"), "--alias", "nope"])
    assert missing.exit_code != 0 and "no completions were served under the alias 'nope'" in str(missing.exception)
