"""`tailor compare` on the tiny model: two methods trained on the same linked data, evaluated on the same questions,
one table cheapest first, compare.json; bad method lists stop before any model loads."""

import json
import sys

import pytest
import yaml

from tailor.cli.compare import compare_table, run_compare, split_overrides
from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    settings = {"base_model": tiny_model_dir,
                "train": {"max_steps": 3, "batch_size": 3, "learning_rate": 1e-2, "save_every": 0, "dtype": "fp32"},
                "methods": {"prompt_tuning": {"num_virtual_tokens": 4}, "lora": {"r": 4, "alpha": 8}},
                "eval": {"max_new_tokens": 3, "batch_size": 2}}
    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump(settings))
    write_jsonl(tmp_path / "run" / "data" / "train.jsonl", [chat(*FACTS[i % 3]) for i in range(6)])
    write_jsonl(tmp_path / "run" / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS[:2]])
    return tmp_path, validate_config(settings)


def test_compare_trains_each_method_on_the_same_data_and_orders_them_cheapest_first(workspace):
    root, config = workspace
    run_dir = root / "run"
    summary = run_compare(config, root, run_dir, ["lora", "prompt_tuning"], show_progress=False,
                          latency_questions=1, method_overrides={"lora": ["methods.lora.r=2"]})
    assert [row["method"] for row in summary["methods"]] == ["prompt_tuning", "lora"]  # 256 < LoRA's parameters
    params = [row["trainable_params"] for row in summary["methods"]]
    assert 0 < params[0] < params[1]
    for row in summary["methods"]:
        method_dir = run_dir / "compare" / row["method"]
        # the data files are links to RUN's, not copies
        assert (method_dir / "data" / "train.jsonl").is_symlink()
        assert (method_dir / "data" / "train.jsonl").resolve() == (run_dir / "data" / "train.jsonl").resolve()
        assert (method_dir / "adapter" / "adapter_config.json").is_file()
        assert row["artifact_bytes"] > 0 and row["latency_ms"] > 0 and row["train_seconds"] > 0
        assert row["steps"] == 3 and 0 <= row["token_f1"] <= 1 and row["eval_loss"] > 0
        # each method's run is a normal run folder: its own eval report on the same questions
        report = json.loads((method_dir / "eval" / "report.json").read_text())
        assert report["n_questions"] == 2 and row["method"] in report["models"]
    # the per-method override reached LoRA only
    lora_config = yaml.safe_load((run_dir / "compare" / "lora" / "adapter" / "tailor.yaml").read_text())
    assert lora_config["methods"]["lora"]["r"] == 2
    assert summary["base"]["trainable_params"] == 0 and summary["base"]["latency_ms"] > 0
    assert json.loads((run_dir / "compare" / "compare.json").read_text()) == summary and summary["pending"] == []
    table = compare_table(summary)
    assert [column.header for column in table.columns][:2] == ["method", "token F1"] and table.row_count == 3


def test_overrides_split_into_common_and_per_method():
    assert split_overrides(["train.max_steps=5", "full:train.learning_rate=5e-5", "eval.limit=3"]) == \
        (["train.max_steps=5", "eval.limit=3"], {"full": ["train.learning_rate=5e-5"]})


@pytest.mark.parametrize("names, overrides, message", [
    (["lora", "qlora"], {}, r"--methods: unknown method 'qlora' \(available: prompt, "),
    (["lora", "lora"], {}, r"--methods: lora listed twice"),
    (["lora"], {"full": ["train.learning_rate=1e-5"]}, r"override 'full:…': full is not among --methods"),
    (["lora"], {"lora": ["methods.lora.r=0"]}, r"tailor compare \(lora\): methods\.lora\.r: Input should be greater"),
])
def test_bad_method_lists_stop_before_any_training(names, overrides, message, workspace):
    root, config = workspace
    with pytest.raises(TailorError, match=message):
        run_compare(config, root, root / "run", names, show_progress=False, method_overrides=overrides)
    assert not (root / "run" / "compare").exists()


def test_the_command_reports_a_bad_method_in_one_line(workspace, monkeypatch, capsys):
    from rich.console import Console

    from tailor.cli.app import main

    root, _ = workspace
    monkeypatch.setattr("tailor.cli.app.err_console", Console(file=sys.stderr))  # the captured stderr
    monkeypatch.setattr(sys, "argv", ["tailor", "compare", "-w", str(root), "--methods", "prompt,lorra"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    assert exit_info.value.code != 0 and "Traceback" not in out.err + out.out
    assert " ".join(out.err.split()).startswith("error: --methods: unknown method 'lorra' (available: prompt,")


def test_keep_going_records_a_failed_method_and_compares_the_others(workspace):
    root, config = workspace
    run_dir = root / "run"
    # from_scratch needs RUN/corpus.jsonl, which this run lacks: it stops with one line, before any model loads
    summary = run_compare(config, root, run_dir, ["from_scratch", "prompt_tuning"], show_progress=False,
                          latency_questions=1, keep_going=True)
    assert list(summary["failed"]) == ["from_scratch"] and "corpus.jsonl" in summary["failed"]["from_scratch"]
    assert [row["method"] for row in summary["methods"]] == ["prompt_tuning"] and summary["pending"] == []
    assert summary["base"]["latency_ms"] > 0  # the base was scored with the first method that ran
    assert json.loads((run_dir / "compare" / "compare.json").read_text())["failed"] == summary["failed"]
    assert "from_scratch" in compare_table(summary).caption
    with pytest.raises(TailorError, match="corpus.jsonl"):  # without keep_going the first failure stops it
        run_compare(config, root, run_dir, ["from_scratch"], show_progress=False, latency_questions=1)


def test_a_derived_run_folder_links_every_input_of_the_run(tmp_path):
    """tune trials and compared methods share one helper: what a method reads in RUN it finds in its own folder,
    dpo's preferences, classification sets and the index included, as links; what it writes stays its own."""
    from tailor.workspace import derive_run_folder

    run_dir = tmp_path / "run"
    inputs = ["corpus.jsonl", "data/train.jsonl", "data/preferences.jsonl", "data/classification/eval.jsonl",
              "data/pretrain/train.jsonl", "index/index.json", "index/bm25/params.index.json"]
    for relative in inputs:
        (run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / relative).write_text(relative)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")  # an output of RUN's own training: not linked
    derived = run_dir / "compare" / "dpo"
    linked = derive_run_folder(run_dir, derived)
    assert sorted(str(path.relative_to(derived)) for path in linked) == sorted(inputs)
    assert all((derived / relative).is_symlink() and (derived / relative).read_text() == relative
               for relative in inputs)
    assert not (derived / "adapter").exists()
    assert derive_run_folder(run_dir, derived) == linked  # again: the links are replaced, nothing piles up
