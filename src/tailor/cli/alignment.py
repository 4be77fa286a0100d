"""`tailor feedback` (user feedback → preference pairs, statistics) and `tailor reward score`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.errors import TailorError

feedback_app = typer.Typer(help="User feedback from `tailor serve` back into training.", no_args_is_help=True)
reward_app = typer.Typer(help="Use a trained reward model.", no_args_is_help=True)

SourceOption = typer.Option(..., "--from", help="The server's feedback SQLite file, or a JSONL file with the same "
                                                "fields (response_id, model, prompt, answer, rating, correction, …).")


@feedback_app.command("export")
def feedback_export(source: Path = SourceOption,
                    output: Path = typer.Option(..., "--output", "-o",
                                                help="Preference pairs JSONL to write.")) -> None:
    """Turn feedback into preference pairs: a thumbs-down with a correction (correction chosen, answer rejected)
    and a thumbs-up and a thumbs-down answer to the same conversation (the liked one chosen)."""
    from tailor.feedback.export import load_feedback, to_pairs
    from tailor.workspace import write_jsonl

    records = load_feedback(source)
    pairs = to_pairs(records)
    if not pairs:
        raise TailorError(f"{source}: {len(records)} feedback records but no preference pair (needs a thumbs-down "
                          f"with a correction, or an up and a down answer to the same conversation); nothing written")
    write_jsonl(output, pairs)
    by_source = {kind: sum(p["source"] == kind for p in pairs) for kind in ("correction", "up_vs_down")}
    console.print(f"[green]exported[/] {len(pairs)} preference pairs from {len(records)} feedback records → "
                  f"{output} ({by_source['correction']} from corrections, {by_source['up_vs_down']} up vs down)",
                  highlight=False, soft_wrap=True)


@feedback_app.command("stats")
def feedback_stats(source: Path = SourceOption) -> None:
    """Per model version: feedback count, up rate and corrections."""
    from tailor.feedback.export import load_feedback, stats

    table = Table(title=f"Feedback in {source.name}")
    for column in ("model", "feedback", "up", "down", "up rate", "corrections", "users"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, row in stats(load_feedback(source)).items():
        table.add_row(model, str(row["count"]), str(row["up"]), str(row["down"]),
                      f"{row['up_rate']:.1%}" if row["up_rate"] is not None else "-", str(row["corrections"]),
                      str(row["users"]))
    console.print(table)


def _conversations(path: Path) -> list[list[dict]]:
    """(prompt, answer) records → conversations ending with the answer; chat `messages` ending with an assistant
    turn are taken as they are."""
    from tailor.workspace import read_jsonl

    conversations = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        if isinstance(record.get("messages"), list):
            messages = record["messages"]
        else:
            prompt, answer = record.get("prompt"), record.get("answer")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if not isinstance(prompt, list) or not isinstance(answer, str):
                raise TailorError(f"{where}: expected \"prompt\" (text or chat messages) and \"answer\" (text), or "
                                  f"chat \"messages\" ending with the assistant's answer")
            messages = [*prompt, {"role": "assistant", "content": answer}]
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) \
                or messages[-1].get("role") != "assistant":
            raise TailorError(f"{where}: the conversation must be chat messages ending with an assistant answer")
        conversations.append(messages)
    if not conversations:
        raise TailorError(f"{path}: no records to score")
    return conversations


@reward_app.command("score")
def reward_score(file: Path = typer.Argument(..., help="JSONL of {prompt, answer} (or chat messages) to score."),
                 reward: Path = typer.Option(None, "--reward", help="A reward run folder or its reward/ folder "
                                             "(default: RUN, trained with `tailor train --method reward`)."),
                 output: Path = typer.Option(None, "--output", "-o", help="Write the records with a \"reward\" "
                                             "field to this JSONL file."),
                 workspace: Path = WorkspaceOption, run: Path = RunOption) -> None:
    """Score (prompt, answer) pairs with a trained reward model."""
    from tailor.methods.reward import load_reward_model, reward_folder, score
    from tailor.workspace import read_jsonl, write_jsonl

    conversations = _conversations(file)  # before the model loads: a bad line costs nothing
    if reward is None:
        _, root = open_workspace(workspace, [], required=False)
        reward = run_folder(root, run)
    model, tokenizer = load_reward_model(reward_folder(reward, key="--reward"))
    scores = score(model, tokenizer, conversations)
    if output is not None:
        write_jsonl(output, ({**record, "reward": round(value, 5)}
                             for (_, record), value in zip(read_jsonl(file), scores, strict=True)))
    table = Table(title=f"Rewards ({len(scores)} answers, mean {sum(scores) / len(scores):.3f})")
    table.add_column("line", justify="right")
    table.add_column("question")
    table.add_column("answer")
    table.add_column("reward", justify="right")
    for line, (messages, value) in enumerate(zip(conversations, scores, strict=True), start=1):
        question = next((m["content"] for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
        table.add_row(str(line), question[:60], messages[-1]["content"][:60], f"{value:.3f}")
    console.print(table)
    if output is not None:
        console.print(f"written to {output}", soft_wrap=True, highlight=False)
