"""MemDLMConfig: the preset equals MEMDLM.md section 6; bad input fails loudly."""

import pytest
from pydantic import ValidationError

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig


def test_defaults_are_the_memdlm_preset():
    c = MemDLMConfig()
    assert (c.inner.steps, c.inner.mode, c.inner.optimizer, c.inner.lr, c.inner.clip) == (2, "first_order", "sgd", 0.1, 1.0)
    assert (c.inner.loss, c.inner.weighting) == ("ce", "inverse_t")
    assert (c.trajectory.kind, c.trajectory.s_pre, c.trajectory.stage1_targets) == ("anchor_consistent", 1.5, "broad")
    assert (c.memory.kind, c.memory.rank, c.memory.alpha, c.memory.dropout) == ("lora", 32, 64.0, 0.0)
    assert (c.memory.layer_fraction, c.memory.targets, c.memory.scale) == (0.1, "ffn", 2.0)
    o = c.outer
    assert (o.lr, o.lr_schedule, o.warmup_ratio, o.weight_decay, o.max_grad_norm) == (2e-5, "cosine", 0.1, 0.0, 1.0)
    assert (o.schedule, o.t_eps, o.weighting, o.normalization) == ("linear", 1e-3, "elbo", "token")
    assert (o.lora.rank, o.lora.alpha, o.lora.dropout, o.lora.target_modules) == (32, 64.0, 0.05, "all-linear")
    assert (c.adapt.anchor_ratio, c.adapt.steps, c.adapt.weighting) == (0.2, 2, "uniform")


@pytest.mark.parametrize(
    "bad",
    [
        {"inner": {"steps": -1}},
        {"inner": {"lr": -1.0}},
        {"inner": {"optimizer": "lbfgs"}},
        {"memory": {"rank": 0}},
        {"memory": {"layer_fraction": 0.0}},
        {"memory": {"layer_fraction": 1.5}},
        {"trajectory": {"s_pre": 0.5}},
        {"outer": {"normalization": "mean"}},
        {"inner": {"optimizer": "metasgd"}},  # needs unrolled
        {"unknown_key": 1},
        {"inner": {"stepz": 2}},
    ],
)
def test_invalid_values_raise(bad):
    with pytest.raises(ValidationError):
        MemDLMConfig.model_validate(bad)


def test_frozen():
    with pytest.raises(ValidationError):
        MemDLMConfig().seed = 3


def test_yaml_round_trip(tmp_path):
    config = MemDLMConfig(inner=InnerConfig(optimizer="metasgd", mode="unrolled", lr=0.05),
                          memory=MemoryConfig(targets=("ff_proj", "up_proj"), rank=4))
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert MemDLMConfig.from_yaml(path) == config


def test_yaml_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  stepz: 3\n")
    with pytest.raises(ValidationError, match="stepz"):
        MemDLMConfig.from_yaml(path)
