"""The sweep file and its search space: no Ray needed."""

import random

import optuna
import pytest
import yaml

from freezelab.policies import from_dict
from freezelab.sweep.results import trial_run_name
from freezelab.sweep.search import DefineByRun
from freezelab.sweep.space import SearchSpace, SweepConfig, load_sweep, validate_space
from freezelab.trainers.config import ConfigError
from tests.conftest import TINY

SPACE = {
    "policies": [
        {"type": "full"},
        {"type": "last_n", "n": {"randint": [1, 3]}},
        {
            "type": "lp_ft",
            "probe_epochs": {"randint": [1, 2]},
            "ft_lr_factor": {"loguniform": [0.01, 1.0]},
        },
        {"type": "bitfit", "include_norm": {"choice": [True, False]}},
    ],
    "params": {"optimizer.lr": {"loguniform": [0.001, 0.1]}},
}


def _sweep(**update):
    return SweepConfig.model_validate({"name": "s", "base": TINY, "space": SPACE, **update})


def test_grid_expands_every_discrete_policy():
    space = SearchSpace.model_validate({"policies": SPACE["policies"][:2] + SPACE["policies"][3:]})
    assert space.grid_policies() == [
        {"type": "full"},
        {"type": "last_n", "n": 1},
        {"type": "last_n", "n": 2},
        {"type": "last_n", "n": 3},
        {"type": "bitfit", "include_norm": True},
        {"type": "bitfit", "include_norm": False},
    ]
    with pytest.raises(ValueError, match="float range"):
        SearchSpace.model_validate(SPACE).grid_policies()


def test_random_samples_stay_in_their_ranges_and_are_valid():
    space = SearchSpace.model_validate(SPACE)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        sample = space.sample(rng)
        policy = from_dict(sample["policy"])  # a valid policy every time
        seen.add(policy.type)
        if policy.type == "last_n":
            assert 1 <= policy.n <= 3
        if policy.type == "lp_ft":
            assert 0.01 <= policy.ft_lr_factor <= 1.0
        assert 0.001 <= sample["params"]["optimizer.lr"] <= 0.1
    assert seen == {"full", "last_n", "lp_ft", "bitfit"}


def test_optuna_define_by_run_samples_only_valid_conditional_policies():
    sweep = _sweep(algorithm="optuna")
    define = DefineByRun(sweep.space.policies, sweep.space.params)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    types = set()
    for _ in range(30):
        trial = study.ask()
        config = define(trial)
        policy = from_dict(config["policy"])
        types.add(policy.type)
        # the type decides which fields were sampled
        sampled = {
            k.split(".")[0]
            for k in trial.params
            if k != "policy_entry" and not k.startswith("param.")
        }
        assert sampled <= {policy.type}
        study.tell(trial, 0.5)
    assert len(types) >= 3


def test_the_optuna_searcher_pickles_as_tune_checkpoints_it():
    # Tune saves its searcher with pickle as the first trial starts, and restores it on
    # --resume: the define-by-run space must survive the round trip with its trials.
    import pickle

    from ray.tune.search.optuna import OptunaSearch

    sweep = _sweep(algorithm="optuna")
    searcher = OptunaSearch(
        space=DefineByRun(sweep.space.policies, sweep.space.params),
        metric="val_acc",
        mode="max",
        seed=0,
    )
    first = searcher.suggest("trial-1")
    searcher.on_trial_complete("trial-1", {"val_acc": 0.5, "training_iteration": 1})
    restored = pickle.loads(pickle.dumps(searcher))
    assert len(restored._ot_study.trials) == 1
    assert from_dict(restored.suggest("trial-2")["policy"]).type in {
        "full",
        "last_n",
        "lp_ft",
        "bitfit",
    }
    assert from_dict(first["policy"])


def test_validation_rejects_a_policy_that_cannot_fit_the_model():
    space = {"policies": [{"type": "last_n", "n": {"randint": [1, 9]}}]}
    with pytest.raises(ConfigError, match="n=6 is larger than the model.s 5 backbone groups"):
        validate_space(_sweep(space=space))
    validate_space(_sweep(space={"policies": [{"type": "last_n", "n": {"randint": [1, 5]}}]}))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"policies": [{"type": "last_n", "m": 1}]}, "has no field 'm'"),
        ({"policies": [{"type": "nope"}]}, "unknown policy type"),
        ({"policies": [{"type": "last_n", "n": {"randint": [3, 1]}}]}, "low <= high"),
        ({"policies": [{"type": "lp_ft", "ft_lr_factor": {"loguniform": [0, 1]}}]}, "low > 0"),
        ({"policies": []}, "at least 1"),
    ],
)
def test_bad_spaces_are_named(space, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.model_validate(space)


def test_sweep_file_with_relative_base_and_pinned_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({k: v for k, v in TINY.items() if k != "mlflow"})
    )
    (tmp_path / "sweep.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "base": "base.yaml",
                "space": {"policies": [{"type": "full"}]},
                "overrides": ["epochs=5"],
            }
        )
    )
    sweep = load_sweep(tmp_path / "sweep.yaml")
    config = sweep.trial_config({"type": "full"}, {}, "t")
    assert config.epochs == 5
    assert config.storage_path == str(tmp_path / "freezelab_runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.scaling.num_workers == 1  # local mode cannot run inside a Tune trial
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_trial_names_are_stable_per_config():
    a = {"policy": {"type": "last_n", "n": 2}, "params": {"optimizer.lr": 0.01}}
    b = {"params": {"optimizer.lr": 0.01}, "policy": {"n": 2, "type": "last_n"}}
    assert trial_run_name("s", a) == trial_run_name("s", b)
    assert trial_run_name("s", a) != trial_run_name("s", {**a, "params": {"optimizer.lr": 0.02}})


@pytest.mark.parametrize(
    "params, needle",
    [
        (
            {"optimizer.lr": {"uniform": [-1.0, -0.5]}},
            "optimizer.lr: Input should be greater than 0",
        ),
        ({"optimizer.momentum": {"uniform": [0.5, 1.5]}}, "optimizer.momentum"),
        ({"optimizer.lr": {"loguniform": [0.001, 0.1]}, "epochs": {"randint": [0, 2]}}, "epochs"),
    ],
)
def test_float_ranges_are_validated_at_their_ends_and_inside(params, needle):
    # A random sweep whose range is invalid must fail before any trial, not after all.
    with pytest.raises(ConfigError, match=needle):
        validate_space(
            _sweep(algorithm="random", space={"policies": [{"type": "full"}], "params": params})
        )


def test_probe_params_cover_ends_and_interior_points():
    space = _sweep(
        algorithm="random",
        space={
            "policies": [{"type": "full"}],
            "params": {"optimizer.lr": {"loguniform": [0.001, 0.1]}},
        },
    ).space
    values = sorted(p["optimizer.lr"] for p in space.probe_params())
    assert values[0] == pytest.approx(0.001) and values[-1] == pytest.approx(0.1)
    assert len(values) == 5 and values[2] == pytest.approx(0.01)


def test_seeds_repeat_every_trial_and_refuse_optuna():
    from freezelab.sweep.search import per_seed

    trials = [{"policy": {"type": "full"}, "params": {"optimizer.lr": 0.1}}]
    assert [t["params"] for t in per_seed(trials, [0, 1])] == [
        {"optimizer.lr": 0.1, "seed": 0},
        {"optimizer.lr": 0.1, "seed": 1},
    ]
    with pytest.raises(ValueError, match="seeds: repeats need a fixed set of trials"):
        _sweep(algorithm="optuna", seeds=[0, 1])
    with pytest.raises(ValueError, match="repeats a seed"):
        _sweep(seeds=[0, 0])


@pytest.mark.parametrize("metric", ["test_acc", "test_loss", "shifted/test_acc/rotate:90"])
def test_a_sweep_never_chooses_on_the_held_out_test_set(metric):
    with pytest.raises(ValueError, match=f"metric '{metric}': the held-out test set judges"):
        _sweep(metric=metric)


def test_the_best_setting_is_chosen_on_its_mean_over_seeds():
    from freezelab.sweep.results import best_row

    def row(policy, seed, metric):
        return {"policy": {"type": policy}, "params": {"seed": seed}, "metric": metric}

    # full has the single best run (0.9) but the lower mean (0.6 against 0.75).
    rows = [row("full", 0, 0.9), row("full", 1, 0.3), row("bitfit", 0, 0.7), row("bitfit", 1, 0.8)]
    best = best_row(rows, _sweep(seeds=[0, 1]))
    assert best["policy"] == {"type": "bitfit"} and best["metric"] == 0.8
