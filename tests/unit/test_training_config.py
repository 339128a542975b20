"""Config validation: every bad value names its field; specs survive a JSON round trip."""

import json

import pytest

from adapters.training.config import Hyperparameters, SearchSpec, TrainingJobSpec, auto_hyperparameters
from adapters.training.replay import replay_count


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_epochs", 0), ("n_epochs", 51), ("batch_size", 513), ("gradient_accumulation_steps", 0),
        ("learning_rate", 1e-1), ("learning_rate", 1e-7), ("lr_scheduler", "constant"), ("warmup_ratio", 0.6),
        ("weight_decay", -0.1), ("lora_r", 0), ("lora_alpha", 2000), ("lora_dropout", 0.9),
        ("target_modules", "q_proj"), ("target_modules", []), ("max_seq_len", 8), ("early_stopping_patience", 101),
        ("max_steps", 0), ("seed", -1), ("n_epochs", 2.5), ("batch_size", True), ("replay_fraction", 0.95),
        ("replay_fraction", -0.1), ("replay_objective", "logits"), ("precision", "fp16"), ("precision", None),
    ],
)
def test_bad_hyperparameter_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Hyperparameters.from_dict({field: value})


def test_unknown_hyperparameter_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="learning_rte"):
        Hyperparameters.from_dict({"learning_rte": 1e-4})


def test_defaults_are_valid_and_replace_validates() -> None:
    hp = Hyperparameters()
    assert hp.replace(lora_r=8).lora_r == 8
    with pytest.raises(ValueError, match="lora_r"):
        hp.replace(lora_r=1000)


def test_auto_precision_is_bf16_only_where_bf16_pays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.training import config

    for pays_off, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(config, "prefers_bf16", lambda pays_off=pays_off: pays_off)
        assert Hyperparameters(precision="auto").resolved_precision() == expected
        assert Hyperparameters().resolved_precision() == "fp32"  # the default is exact on every CPU
        assert Hyperparameters(precision="bf16").resolved_precision() == "bf16"


def test_spec_json_round_trip() -> None:
    spec = TrainingJobSpec(
        method="sft", base_model_path="/m", train_path="/t.jsonl", validation_path="/v.jsonl", output_dir="/o",
        hyperparameters=Hyperparameters(lora_r=8, target_modules=["q_proj", "v_proj"], max_steps=5),
        search=SearchSpec(n_trials=3, space={"learning_rate": [1e-5, 1e-3], "lora_r": [4, 8]}),
        eval_every_steps=7,
    )
    again = TrainingJobSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(again.to_json())["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]


def test_spec_rejects_unknown_fields_and_methods() -> None:
    base = {"method": "sft", "base_model_path": "/m", "train_path": "/t", "output_dir": "/o"}
    with pytest.raises(ValueError, match="epochs"):
        TrainingJobSpec.from_dict({**base, "epochs": 3})
    with pytest.raises(ValueError, match="method"):
        TrainingJobSpec.from_dict({**base, "method": "ppo"})
    with pytest.raises(ValueError, match="validation_path"):
        TrainingJobSpec.from_dict({**base, "search": {"n_trials": 2, "space": {"lora_r": [4, 8]}}})
    with pytest.raises(ValueError, match="replay_fraction applies to sft only"):
        TrainingJobSpec.from_dict({**base, "method": "dpo", "hyperparameters": {"replay_fraction": 0.2}})


@pytest.mark.parametrize(("n_train", "fraction", "available", "expected"),
                         [(24, 0.25, 240, 8), (762, 0.2, 240, 190), (1000, 0.5, 240, 240), (10, 0.0, 240, 0)])
def test_replay_rows_make_up_the_asked_share_of_the_mix(n_train: int, fraction: float, available: int,
                                                         expected: int) -> None:
    assert replay_count(n_train, fraction, available) == expected


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": [1e-3, 1e-5]}, "low < high"),
        ({"learning_rate": [1e-5, 1.0]}, "learning_rate"),
        ({"lora_r": [4, 1000]}, "lora_r"),
        ({"optimizer": ["adam"]}, "optimizer"),
        ({"lora_r": []}, "non-empty"),
    ],
)
def test_search_space_is_validated(space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchSpec(n_trials=2, space=space)


def test_auto_hyperparameters_follow_the_documented_table() -> None:
    small = auto_hyperparameters(50, 40, 135_000_000)
    assert (small.n_epochs, small.learning_rate, small.lora_r, small.early_stopping_patience) == (10, 2e-4, 16, 0)
    assert 50 / small.batch_size >= 20 or small.batch_size == 1
    big = auto_hyperparameters(20_000, 300, 7_000_000_000)
    assert (big.n_epochs, big.learning_rate, big.batch_size, big.max_seq_len) == (2, 1e-4, 6, 1024)
    assert big.early_stopping_patience == 3
    # SFT replays the base model's answers (KL) against forgetting; the rows must leave room for them
    assert (small.replay_fraction, small.replay_objective, small.max_seq_len) == (0.24, "kl", 128)
    preference = auto_hyperparameters(50, 20, 135_000_000, method="dpo")
    assert (preference.replay_fraction, preference.max_seq_len) == (0.0, 64)
    with pytest.raises(ValueError, match="n_train_rows"):
        auto_hyperparameters(0, 10, 1)


def test_a_parent_adapter_fixes_the_lora_shape(tmp_path) -> None:
    from adapters.training.config import inherit_lora_shape

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"}))
    hp = Hyperparameters(lora_r=16).to_dict()
    inherited = inherit_lora_shape(hp, tmp_path)  # nothing explicit: the parent's shape wins
    assert (inherited["lora_r"], inherited["lora_alpha"], inherited["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    assert inherit_lora_shape({**hp, "lora_r": 8, "target_modules": ["q_proj", "v_proj"]}, tmp_path,
                              explicit={"lora_r", "target_modules"})["lora_r"] == 8
    assert inherit_lora_shape(hp, tmp_path, explicit={"target_modules"})["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"^lora_r must match the parent adapter's \(8\)"):
        inherit_lora_shape(hp, tmp_path, explicit={"lora_r"})
    with pytest.raises(ValueError, match="^target_modules must match"):
        inherit_lora_shape({**hp, "target_modules": ["q_proj"]}, tmp_path, explicit={"target_modules"})
    with pytest.raises(ValueError, match="no adapter_config.json"):
        inherit_lora_shape(hp, tmp_path / "missing")
