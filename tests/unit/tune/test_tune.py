"""`tailor tune` on the tiny model: every trial trains 2-4 steps and evaluates 3 questions with 4-token answers."""

import json
import multiprocessing
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.config import apply_overrides, load_config, validate_config
from tailor.errors import TailorError
from tailor.tune import open_study, run_tune
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """A workspace whose tailor.yaml searches learning rate and LoRA rank; RUN/data is already built."""
    write_jsonl(tmp_path / "run" / "data" / "train.jsonl", [chat(f"{FACTS[i % 3][0]} ({i})", FACTS[i % 3][1])
                                                         for i in range(8)])
    write_jsonl(tmp_path / "run" / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS])
    data = {"base_model": tiny_model_dir, "project": "tiny",
            "train": {"max_steps": 3, "batch_size": 4, "dtype": "fp32", "warmup_ratio": 0.0},
            "methods": {"lora": {"r": 4, "alpha": 8}},
            "eval": {"max_new_tokens": 4},
            "tune": {"metric": "eval_loss", "sampler": "random", "trials": 4, "report_every": 1,
                     "space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                               "methods.lora.r": {"type": "int", "low": 2, "high": 8, "step": 2}}}}
    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def tune(workspace, *overrides, space=None):
    """Search as `tailor tune` does; `space` updates tune.space (its dotted keys cannot be overrides)."""
    data = apply_overrides(yaml.safe_load((workspace / "tailor.yaml").read_text()), list(overrides))
    data["tune"]["space"].update(space or {})
    return run_tune(validate_config(data), data, workspace, workspace / "run")


def finished(study):
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def test_random_search_writes_a_usable_best_config_and_report(workspace):
    result = tune(workspace)
    assert result.trials_run == 4 and len(finished(result.study)) == 4
    assert result.direction == "minimize"  # eval_loss defaults to lower is better
    complete = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert result.best_value == min(t.value for t in complete)
    best, _ = load_config(result.best_config)
    assert best.train.learning_rate == pytest.approx(result.best_values["train.learning_rate"])
    assert best.method_options("lora").r == result.best_values["methods.lora.r"]
    assert best.base_model == yaml.safe_load((workspace / "tailor.yaml").read_text())["base_model"]
    best_trial = workspace / "run" / "tune" / f"trial-{result.best_trial}"
    assert (best_trial / "adapter" / "adapter_config.json").is_file()
    assert (best_trial / "data" / "train.jsonl").read_text() == (workspace / "run/data/train.jsonl").read_text()
    page = result.report.read_text()
    assert "Optimization history" in page and "Parallel coordinates" in page
    assert page.count("Plotly.newPlot") >= 3 and "<script src=" not in page  # plotly.js inline: opens offline
    assert (workspace / "run" / "tune" / "study.db").is_file()


def test_grid_search_enumerates_the_grid(workspace):
    result = tune(workspace, "tune.sampler=grid", "tune.trials=null", "train.max_steps=2", space={
        "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "choices": [1e-3, 1e-2]},
        "methods.lora.r": {"type": "categorical", "choices": [2, 4]}})
    tried = sorted((t.params["train.learning_rate"], t.params["methods.lora.r"]) for t in result.study.trials)
    assert tried == [(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]


def test_interrupted_study_resumes_without_rerunning_trials(workspace):
    first = tune(workspace, "tune.trials=2", "train.max_steps=2")
    assert first.trials_run == 2
    # resumed through the command line, asking for 4 in total: 2 more run
    result = CliRunner().invoke(app, ["tune", "-w", str(workspace), "--trials", "4", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "2 trial(s) run by this process, 4 finished" in result.output and "best.yaml" in result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workspace / 'run/tune/study.db'}")
    assert len(finished(study)) == 4 and [t.number for t in study.trials] == [0, 1, 2, 3]
    # the resumed sampler is reseeded: it does not propose the first trials again
    assert study.trials[2].params != first.study.trials[0].params


def test_pruned_trials_stop_training_early_and_count_as_finished(workspace, monkeypatch):
    import tailor.tune.search

    # a pruner that stops every trial at its second report, so the test does not depend on noisy losses
    monkeypatch.setattr(tailor.tune.search, "_pruner", lambda config, every, warmup: optuna.pruners.ThresholdPruner(
        upper=0.0, n_warmup_steps=2))
    with pytest.raises(TailorError, match="no trial of study 'tiny' completed"):
        tune(workspace, "tune.trials=2", "train.max_steps=4")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workspace / 'run/tune/study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2] and trial.user_attrs["steps"] == 2  # not 4
        trial_dir = workspace / "run" / "tune" / f"trial-{trial.number}"
        assert not (trial_dir / "adapter").exists() and not (trial_dir / "checkpoints").exists()
    # pruned trials count as done: asking again for 2 trials runs none (and still none completed)
    with pytest.raises(TailorError, match="completed"):
        tune(workspace, "tune.trials=2")
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{workspace / 'run/tune/study.db'}").trials) == 2


def _worker(workspace, finished_by_me):
    finished_by_me.put(tune(workspace, "train.max_steps=2").trials_run)


def test_two_worker_processes_share_one_study(workspace):
    config, _ = load_config(workspace)
    open_study(config, workspace / "run")  # the shared database exists before the workers start
    # forked, so the workers skip the seconds of importing torch again; each opens its own database connection
    context = multiprocessing.get_context("fork")
    finished_by = context.Queue()
    workers = [context.Process(target=_worker, args=(workspace, finished_by)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    for worker in workers:  # a hung worker must not outlive the test
        if worker.is_alive():
            worker.terminate()
    assert [worker.exitcode for worker in workers] == [0, 0]
    counts = [finished_by.get(timeout=5) for _ in workers]
    assert all(count >= 1 for count in counts), counts  # both workers did some of the work
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workspace / 'run/tune/study.db'}")
    # together they reach the total; at most one extra trial when both were mid-trial as it was reached
    assert 4 <= len(finished(study)) == sum(counts) <= 5
    assert (workspace / "run" / "tune" / "best.yaml").is_file()


@pytest.mark.parametrize(("space", "message"), [
    ({"train.learning_rate": {"type": "float", "low": 1e-2, "high": 1e-4}},
     r"tune\.space\.train\.learning_rate: empty range: low \(0\.01\) must be below high \(0\.0001\)"),
    ({"train.learning_rte": {"type": "float", "low": 1e-4, "high": 1e-2}},
     r"tune\.space\.train\.learning_rte: not a searchable key"),
    ({"methods.lora.rank": {"type": "int", "low": 2, "high": 8}},
     r"tune\.space\.methods\.lora\.rank: method 'lora' has no option 'rank' \(it has: r, alpha"),
    ({"methods.lora.r": {"type": "integer", "low": 2, "high": 8}},
     r"tune\.space\.methods\.lora\.r\.type: Input should be 'float', 'int' or 'categorical'"),
    ({"methods.lora.targets": {"type": "categorical"}},
     r"tune\.space\.methods\.lora\.targets: categorical needs a non-empty `choices` list"),
])
def test_bad_space_is_one_clear_line(tiny_model_dir, space, message):
    with pytest.raises(TailorError, match=message):
        validate_config({"base_model": tiny_model_dir, "tune": {"space": space}})


@pytest.mark.parametrize(("space", "message"), [
    ({"methods.lora.r": {"type": "int", "low": 2, "high": 8, "step": 2}},  # the float learning rate has no step
     r"tune\.space\.train\.learning_rate: the grid sampler needs `choices` or `step` for a float range"),
    ({"methods.lora.dropout": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5}},
     r"tune\.space\.methods\.lora\.dropout: the value 2\.0 is not allowed"),
])
def test_bad_values_stop_before_any_model_loads(workspace, space, message, monkeypatch):
    import tailor.train.run

    monkeypatch.setattr(tailor.train.run, "run_training", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(TailorError, match=message):
        tune(workspace, "tune.sampler=grid", space=space)


def test_a_repeated_point_is_not_trained_again(workspace):
    # one possible value: the second trial proposes the first one's point again
    space = {"train.learning_rate": {"type": "categorical", "choices": [1.0e-3]},
             "methods.lora.r": {"type": "categorical", "choices": [4]}}
    data = yaml.safe_load((workspace / "tailor.yaml").read_text())
    data["tune"].update({"space": space, "trials": 2, "pruner": "none", "startup_trials": 1})
    result = run_tune(validate_config(data), data, workspace, workspace / "run")
    first, second = result.study.trials
    assert first.user_attrs["steps"] == 3 and second.user_attrs["steps"] == 0
    assert second.user_attrs["repeats"] == 0 and second.value == first.value
    assert not (workspace / "run" / "tune" / "trial-1" / "adapter").exists()


def test_median_pruner_waits_for_the_warm_up_and_never_prunes_the_last_step(workspace):
    # a finished trial whose eval loss is 0 at every step: every new trial trails it, so the pruner decides at the
    # first step it is allowed to
    data = apply_overrides(yaml.safe_load((workspace / "tailor.yaml").read_text()),
                           ["tune.pruner=median", "tune.startup_trials=1", "train.max_steps=4"])
    config = validate_config(data)
    study = open_study(config, workspace / "run")
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 1e-3, "methods.lora.r": 4},
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "methods.lora.r": optuna.distributions.IntDistribution(2, 8, step=2)},
        value=0.0, intermediate_values=dict.fromkeys(range(1, 5), 0.0)))

    result = run_tune(validate_config(apply_overrides(data, ["tune.trials=2", "tune.pruner_warmup_steps=2"])),
                      data, workspace, workspace / "run")
    warmed = result.study.trials[1]
    assert warmed.state == optuna.trial.TrialState.PRUNED
    assert sorted(warmed.intermediate_values) == [1, 2] and warmed.user_attrs["steps"] == 2  # not at step 1

    # a warm-up as long as the run: the last step is reported but the trial finishes and is evaluated
    result = run_tune(validate_config(apply_overrides(data, ["tune.trials=3", "tune.pruner_warmup_steps=4"])),
                      data, workspace, workspace / "run")
    last = result.study.trials[2]
    assert last.state == optuna.trial.TrialState.COMPLETE and last.user_attrs["steps"] == 4
    assert sorted(last.intermediate_values) == [1, 2, 3, 4] and last.value > 0


def test_default_warm_up_is_the_first_report_for_halving_and_a_third_of_the_run_for_the_median(workspace):
    from tailor.tune.search import _pruner, pruner_warmup

    data = yaml.safe_load((workspace / "tailor.yaml").read_text())
    config = validate_config(apply_overrides(data, ["train.max_steps=12"]))
    assert config.tune.pruner == "successive_halving"  # the default
    assert pruner_warmup(config, 8, every=2) == 2
    halving = _pruner(config, 2, pruner_warmup(config, 8, every=2))
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner) and halving._min_resource == 2
    median = validate_config(apply_overrides(data, ["train.max_steps=12", "tune.pruner=median"]))
    assert pruner_warmup(median, 8, every=2) == 4
    assert pruner_warmup(validate_config(apply_overrides(data, ["train.max_steps=3", "tune.pruner=median"])), 8,
                         every=2) == 2
    assert pruner_warmup(validate_config(apply_overrides(data, ["tune.pruner_warmup_steps=0"])), 8, every=2) == 0
    assert _pruner(config, 2, 6)._min_resource == 6  # a longer warm-up moves the first rung


def _space(config_data, tiny_model_dir):
    return validate_config({"base_model": tiny_model_dir, "tune": {"space": config_data}}).tune.space


class _Proposes(optuna.samplers.BaseSampler):
    """A base sampler that always proposes one point (what TPE does when it has settled on its best)."""

    def __init__(self, point, space):
        from tailor.tune.space import _finite

        self.point, self.distributions = point, {key: _finite(dimension)[0] for key, dimension in space.items()}

    def infer_relative_search_space(self, study, trial):
        return self.distributions

    def sample_relative(self, study, trial, search_space):
        return dict(self.point)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.point[param_name]


SMALL_SPACE = {"methods.lora.targets": {"type": "categorical", "choices": [["q_proj"], ["q_proj", "v_proj"]]},
               "methods.lora.r": {"type": "int", "low": 2, "high": 8, "step": 2}}


def _ask(study, space):
    from tailor.tune.space import sample

    trial = study.ask()
    values = sample(trial, space)
    study.tell(trial, 1.0)
    return values


def test_untried_first_replaces_a_tried_proposal_by_the_nearest_untried_point(tiny_model_dir):
    from tailor.tune.space import UntriedFirst, untried_first

    space = _space(SMALL_SPACE, tiny_model_dir)
    study = optuna.create_study()
    tried = {"methods.lora.targets": '["q_proj"]', "methods.lora.r": 4}
    study.sampler = untried_first(_Proposes(tried, space), space, seed=0)
    assert isinstance(study.sampler, UntriedFirst)
    assert _ask(study, space) == {"methods.lora.targets": ["q_proj"], "methods.lora.r": 4}  # new: it stands
    # tried now: the next proposals are the untried points nearest to it, one dimension changed by one value
    # (a categorical's other choice, r one step up or down) before r 8 (two steps) or two changes
    nearest = {tuple(json.dumps(v) for v in _ask(study, space).values()) for _ in range(3)}
    assert nearest == {('["q_proj"]', "2"), ('["q_proj"]', "6"), ('["q_proj", "v_proj"]', "4")}
    for _ in range(4):  # the rest of the 2 x 4 points, each once
        _ask(study, space)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 8
    # every point tried: the base sampler's proposal stands (the search reuses its result)
    assert _ask(study, space) == {"methods.lora.targets": ["q_proj"], "methods.lora.r": 4}


def test_once_every_point_is_tried_each_pruned_point_gets_one_unpruned_run_best_first(tiny_model_dir):
    from tailor.tune.search import PruningReporter, reuse_same_point
    from tailor.tune.space import sample, untried_first

    space = _space(SMALL_SPACE, tiny_model_dir)
    study = optuna.create_study()
    settled = {"methods.lora.targets": '["q_proj"]', "methods.lora.r": 4}
    study.sampler = untried_first(_Proposes(settled, space), space, seed=0)
    first_report = {}  # point -> eval loss at the first report; three points pruned there
    for number, loss in enumerate([1.0, 1.5, 1.1, 1.2, 1.9, 1.3, 1.05, 1.4]):
        trial = study.ask()
        point = tuple(json.dumps(v) for v in sample(trial, space).values())
        trial.report(loss, 2)
        pruned = number in (1, 3, 4)
        first_report[point] = loss if pruned else None
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned else study.tell(trial, loss)
    chances = sorted((loss, point) for point, loss in first_report.items() if loss is not None)

    for loss, point in chances:  # lowest first-report loss first, each once, trained to the end
        trial = study.ask()
        assert tuple(json.dumps(v) for v in sample(trial, space).values()) == point
        assert reuse_same_point(study, trial) is None
        reporter = PruningReporter(trial, Path("unused"), every=2, maximize=False, last_step=12)
        assert reporter.second_chance and "second_chance" in trial.user_attrs
        study.tell(trial, loss - 0.5)
    # every pruned point had its chance: the base sampler's proposal stands, its finished result reused
    trial = study.ask()
    assert sample(trial, space) == {"methods.lora.targets": ["q_proj"], "methods.lora.r": 4}
    assert reuse_same_point(study, trial) == 1.0


def test_a_repeat_of_a_pruned_point_that_is_not_its_second_chance_is_pruned_again(tiny_model_dir):
    from tailor.tune.search import reuse_same_point
    from tailor.tune.space import sample

    space = _space(SMALL_SPACE, tiny_model_dir)
    study = optuna.create_study()
    points = [{"methods.lora.targets": '["q_proj"]', "methods.lora.r": r} for r in (2, 4)]
    for point, loss in zip(points, (1.0, 2.0), strict=True):  # both pruned; r 2 looked better
        study.sampler = _Proposes(point, space)
        trial = study.ask()
        sample(trial, space)
        trial.report(loss, 2)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    study.sampler = _Proposes(points[1], space)
    trial = study.ask()
    sample(trial, space)
    with pytest.raises(optuna.TrialPruned):
        reuse_same_point(study, trial)


def test_untried_first_skips_points_other_workers_are_training(tiny_model_dir):
    from tailor.tune.search import _sampler
    from tailor.tune.space import sample

    config = validate_config({"base_model": tiny_model_dir, "tune": {"sampler": "random", "space": SMALL_SPACE}})
    study = optuna.create_study()
    for worker in range(8):  # 8 workers start a trial each on the 8 points, none finished yet
        study.sampler = _sampler(config, seed=worker)
        sample(study.ask(), config.tune.space)
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 8


def test_float_ranges_are_sampled_as_they_are(tiny_model_dir):
    from tailor.tune.space import untried_first

    base = optuna.samplers.RandomSampler(seed=0)
    space = _space({**SMALL_SPACE, "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
                   tiny_model_dir)
    assert untried_first(base, space, seed=0) is base  # a float range never repeats a value


def test_bayesian_search_trains_each_point_of_a_small_space_once(workspace):
    # 4 points and 4 trials: TPE alone proposes its best point again after the start-up trial
    result = tune(workspace, "tune.sampler=bayesian", "tune.startup_trials=1", "tune.pruner=none",
                  "train.max_steps=2", space={
                      "train.learning_rate": {"type": "categorical", "choices": [1.0e-3, 1.0e-2]},
                      "methods.lora.r": {"type": "categorical", "choices": [2, 4]}})
    points = {(t.params["train.learning_rate"], t.params["methods.lora.r"]) for t in result.study.trials}
    assert points == {(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)}
    assert [t.user_attrs["steps"] for t in result.study.trials] == [2, 2, 2, 2]


def test_trials_read_the_corpus_and_every_data_file_of_the_run(workspace):
    """continued_pretraining (and from_scratch) train on RUN/corpus.jsonl: a trial folder must hold it, and the
    rest of RUN's data (subfolders included), as links."""
    run_dir = workspace / "run"
    write_jsonl(run_dir / "corpus.jsonl", [{"text": f"{q} {a} " * 6, "source": f"doc{i}.txt", "chunk": 0}
                                           for i, (q, a) in enumerate(FACTS * 3)])
    write_jsonl(run_dir / "data" / "pretrain" / "train.jsonl", [{"text": "a block"}])
    result = tune(workspace, "train.method=continued_pretraining", "tune.trials=1",
                  "methods.continued_pretraining.block_tokens=32", "methods.continued_pretraining.overlap_tokens=4",
                  "methods.continued_pretraining.eval_fraction=0")
    assert result.trials_run == 1 and len(finished(result.study)) == 1
    trial = run_dir / "tune" / "trial-0"
    for relative in ("corpus.jsonl", "data/train.jsonl", "data/eval.jsonl", "data/pretrain/train.jsonl"):
        assert (trial / relative).is_symlink() and (trial / relative).resolve() == (run_dir / relative).resolve()
    assert (trial / "model" / "config.json").is_file()  # the whole model continued pre-training saves


def test_a_resumed_study_does_not_repeat_the_trials_of_a_neighbouring_seed(tiny_model_dir):
    from tailor.tune.search import configure_study, sampler_seed
    from tailor.tune.space import sample

    space = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}

    def study_with(seed, trials_before=0, worker=0):
        config = validate_config({"base_model": tiny_model_dir, "tune": {"sampler": "random", "seed": seed,
                                                                         "space": space}})
        study = optuna.create_study()
        for _ in range(trials_before):  # trials of an earlier run of the study
            study.enqueue_trial({"train.learning_rate": 1e-3})
            _ask(study, config.tune.space)
        configure_study(study, config, worker=worker)
        return study, config

    def first_proposals(study, config, n=3):
        return [sample(study.ask(), config.tune.space)["train.learning_rate"] for _ in range(n)]

    assert sampler_seed(5, 0, 0) == sampler_seed(5, 0, 0) != 5  # hashed, so no additive-rule study repeats it
    fresh_seed_1 = first_proposals(*study_with(1))
    assert first_proposals(*study_with(1)) == fresh_seed_1  # the same seed proposes the same trials
    # seed 0 resumed after one trial, and the second worker of seed 1, each propose their own values
    for resumed_or_worker in (first_proposals(*study_with(0, trials_before=1)),
                              first_proposals(*study_with(1, worker=1))):
        assert not set(resumed_or_worker) & set(fresh_seed_1)
    assert len({sampler_seed(seed, trials, worker) for seed in range(3) for trials in range(13)
                for worker in range(3)}) == 3 * 13 * 3
