import pytest

from tailor.cli.init import render_config
from tailor.config import TailorConfig, apply_overrides, load_config, validate_config
from tailor.errors import TailorError


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    (tmp_path / "tailor.yaml").write_text("train:\n  learnig_rate: 0.1\n")
    with pytest.raises(TailorError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert "unknown key 'train.learnig_rate'" in message
    assert "learning_rate" in message and "\n" not in message


def test_bad_value_names_the_key():
    with pytest.raises(TailorError, match=r"train\.batch_size: .*greater than 0"):
        validate_config({"train": {"batch_size": 0}})


def test_unknown_method_lists_available():
    with pytest.raises(TailorError, match=r"train\.method: unknown method 'lorax' \(available: .*lora"):
        validate_config({"train": {"method": "lorax"}})


def test_method_options_validated():
    with pytest.raises(TailorError, match="greater than 0"):
        validate_config({"methods": {"lora": {"r": 0}}})
    config = validate_config({"methods": {"lora": {"r": 4}}})
    assert config.method_options("lora").r == 4
    assert config.method_options("lora").alpha == 32  # default filled in


def test_dotted_overrides_keep_types(tmp_path):
    (tmp_path / "tailor.yaml").write_text("project: x\n")
    config, root = load_config(tmp_path, ["train.learning_rate=1e-4", "train.epochs=2", "data.qa_files=[a.csv]"])
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.epochs == 2 and config.data.qa_files == ["a.csv"]
    assert root == tmp_path


def test_override_without_equals_is_rejected():
    with pytest.raises(TailorError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.learning_rate"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    (tmp_path / "tailor.yaml").write_text("project: x\ntrain: [\n")
    with pytest.raises(TailorError, match=r"tailor\.yaml:\d+: invalid YAML"):
        load_config(tmp_path)


def test_init_template_round_trips_to_defaults(tmp_path):
    (tmp_path / "tailor.yaml").write_text(render_config(TailorConfig()))
    config, _ = load_config(tmp_path)
    assert config == TailorConfig()
    assert "# Peak learning rate." in (tmp_path / "tailor.yaml").read_text()
