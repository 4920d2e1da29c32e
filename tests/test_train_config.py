"""The training config tree: one declaration of the KD options, structured range errors, derived quantities, and
the command-line options generated from the fields."""

from __future__ import annotations

import dataclasses

import pytest

from cachekd.config import field_docs, from_dict
from cachekd.errors import CachekdError, ConfigFieldError
from cachekd.kd_options import KDOptions
from cachekd.losses import KDConfig
from cachekd.train_config import DataConfig, DistillConfig, TrainConfig, load_train_config


def test_kd_fields_are_declared_once():
    shared = {f.name for f in dataclasses.fields(KDOptions)}
    assert shared == {"objective", "beta", "skew_lambda", "tail_mode", "teacher_combine", "teacher_weights",
                      "detach_mix", "reduction"}
    assert issubclass(KDConfig, KDOptions) and issubclass(DistillConfig, KDOptions)
    assert shared <= {f.name for f in dataclasses.fields(KDConfig)}
    assert shared <= {f.name for f in dataclasses.fields(DistillConfig)}


def test_kd_config_carries_every_shared_field():
    d = from_dict(DistillConfig, {"objective": "rkl", "beta": 0.3, "skew_lambda": 0.2, "tail_mode": "uniform",
                                  "teacher_combine": "probs", "teacher_weights": [1, 3], "detach_mix": False,
                                  "reduction": "batchmean", "temperature": 2.0}, "distill")
    kd = d.kd_config(1.5)
    assert kd == KDConfig(objective="reverse_kl", beta=0.3, skew_lambda=0.2, tail_mode="uniform",
                          teacher_combine="probs", teacher_weights=(1.0, 3.0), detach_mix=False,
                          reduction="batchmean", temperature=1.5)
    # `teacher_weights: []` in YAML means equal weights, as before
    assert from_dict(DistillConfig, {"teacher_weights": []}, "distill").kd_config(1.0).teacher_weights is None


@pytest.mark.parametrize("data,key,rule,value", [
    ({"distill": {"beta": 1.5}}, "distill.beta", "in [0, 1]", 1.5),
    ({"distill": {"tail_mode": "drop"}}, "distill.tail_mode", "one of bucket, uniform, renormalize", "drop"),
    ({"distill": {"alpha": 2}}, "distill.alpha", "in [0, 1]", 2.0),
    ({"distill": {"teacher_weights": [1, -1]}}, "distill.teacher_weights", "finite and >= 0", [1.0, -1.0]),
    ({"optim": {"max_time_s": -1}}, "optim.max_time_s", "a number of seconds >= 0, or null for no time limit", -1.0),
    ({"optim": {"lr": "abc"}}, "optim.lr", "a number", "abc"),
    ({"seed": 1.5}, "seed", "a whole number", 1.5),
])
def test_range_errors_are_structured(data, key, rule, value):
    with pytest.raises(ConfigFieldError) as e:
        load_train_config({"output": "x", **data})
    assert (e.value.key, e.value.rule, e.value.value) == (key, rule, value)
    assert isinstance(e.value, CachekdError) and str(e.value).startswith(f"{key} must be {rule} (got ")
    assert "--" not in str(e.value)  # the library names keys, never options


def test_schedule_point_errors_name_the_point():
    with pytest.raises(ConfigFieldError) as e:
        load_train_config({"output": "x", "distill": {"alpha": {"kind": "linear", "start": 0.9, "end": 1.5}}})
    assert (e.value.key, e.value.part, e.value.kind, e.value.value) == ("distill.alpha", "end", "linear", 1.5)
    assert e.value.message(label="ignored") == "distill.alpha.end (linear schedule) must be in [0, 1] (got 1.5)."


def test_losses_keep_their_own_field_names():
    with pytest.raises(ConfigFieldError, match=r"^beta must be in \[0, 1\]") as e:
        KDConfig(beta=2.0)
    assert e.value.key == "beta"
    with pytest.raises(ConfigFieldError, match=r"^temperature must be a positive number"):
        KDConfig(temperature=0.0)


@pytest.mark.parametrize("batch,micro,world,local,micro_out,accum", [
    (32, None, 1, 32, 32, 1), (32, 8, 1, 32, 8, 4), (32, 4, 2, 16, 4, 4), (12, None, 3, 4, 4, 1),
])
def test_derived_batch_quantities(batch, micro, world, local, micro_out, accum):
    d = DataConfig(batch_size=batch, micro_batch_size=micro)
    assert (d.local_batch(world), d.micro_batch(world), d.accumulation_steps(world)) == (local, micro_out, accum)
    assert d.local_batch(world) == d.micro_batch(world) * d.accumulation_steps(world)
    assert d.tokens_per_step(16) == batch * 16


def test_derived_batch_quantities_refuse_what_does_not_divide():
    with pytest.raises(CachekdError, match=r"data.batch_size \(10\) must be divisible by the number of processes"):
        DataConfig(batch_size=10).local_batch(4)
    with pytest.raises(CachekdError, match=r"per-process batch \(16\) must be a multiple of data.micro_batch_size"):
        DataConfig(batch_size=32, micro_batch_size=5).micro_batch(2)


def test_field_docs_follow_the_fields_and_their_bases():
    docs = field_docs(DistillConfig)
    assert docs["beta"].startswith("JSD weight β in [0, 1]")  # declared on KDOptions
    assert docs["chunk_size"].startswith("Step-wise loss")
    assert "\n" not in docs["tail_mode"] and "  " not in docs["tail_mode"]
    assert "shuffle" not in field_docs(DataConfig)  # no docstring, no entry


def test_cli_options_come_from_the_config_fields():
    import click

    from cachekd_cli.config_options import DISTILL_OPTIONS, TRAIN_OPTIONS, config_options, flag_of
    from cachekd_cli.train_cmd import distill_command

    opts = {o.config_key: o for o in config_options({**TRAIN_OPTIONS, **DISTILL_OPTIONS})}  # every key is a field
    assert set(opts) == set(TRAIN_OPTIONS) | set(DISTILL_OPTIONS)
    assert opts["optim.max_steps"].type == click.INT and opts["distill.alpha"].type == click.FLOAT
    assert list(opts["distill.tail_mode"].type.choices) == ["bucket", "uniform", "renormalize"]
    assert opts["distill.objective"].type == click.STRING  # takes the short names (rkl) the config resolves
    assert opts["distill.online"].is_flag and all(o.default in (None, False) for o in opts.values())
    assert opts["optim.lr"].help == "Peak learning rate, reached after the warmup (optim.lr)."
    assert flag_of("distill.alpha") == "--alpha" and flag_of("output") == "--output" and flag_of("distill.beta") is None
    names = {p.name for p in distill_command.get_params(click.Context(distill_command))}
    assert {"max_time", "tail_mode", "teacher_combine", "online", "online_teachers", "overrides", "force"} <= names



def test_saved_config_keeps_its_key_order():
    """config.yaml lists the distill keys as it always has (teachers first, then how many the config is written
    for), although the loss options are declared on the shared base class; old files read the same."""
    from cachekd.config import to_dict

    cfg = load_train_config({"output": "x", "distill": {"objective": "tv"}})
    assert list(to_dict(cfg)["distill"]) == [
        "cache", "teachers", "num_teachers", "online", "objective", "temperature", "ce_weight", "alpha", "tail_mode",
        "teacher_combine", "teacher_weights", "beta", "skew_lambda", "detach_mix", "reduction", "chunk_size"]
    assert load_train_config(to_dict(cfg)) == cfg


def test_chunk_size_is_memory_not_identity():
    """The step-wise loss's chunk size changes memory, not the loss: a run may resume with another one (the ChooBaCa
    presets moved from 32 to 128), while a training value such as the objective still must match."""
    from cachekd.train_config import config_identity

    def cfg(**distill):
        return load_train_config({"output": "x", "data": {"store": "s"},
                                  "distill": {"cache": "c", "objective": "reverse_kl", **distill}})

    assert config_identity(cfg(chunk_size=32)) == config_identity(cfg(chunk_size=128))
    assert config_identity(cfg(chunk_size=32)) == config_identity(cfg())
    assert config_identity(cfg(chunk_size=32)) != config_identity(cfg(chunk_size=32, objective="forward_kl"))
    from cachekd.config import PRESET_DIR, load_yaml

    for preset in sorted(PRESET_DIR.glob("choobaca-*.yaml")):
        assert load_yaml(preset)["distill"]["chunk_size"] == 128, preset.name


def test_key_orders_list_every_field_once():
    """config.yaml keeps its key order (the cadence fields last, though they come from a base class)."""
    from cachekd.cohort.config import CohortConfig

    for cls in (TrainConfig, CohortConfig, DistillConfig):
        assert sorted(cls.key_order) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__
    assert TrainConfig.key_order[:5] == ("name", "output", "seed", "device", "precision")
    assert TrainConfig.key_order[-5:] == ("log_every", "eval_every", "save_every", "keep_checkpoints", "tensorboard")
