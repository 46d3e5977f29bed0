"""quantization_config validation: every bad value is a ValueError naming the key."""

import copy

import pytest

from vllm_rsparse.config import RSparseCheckpointConfig, RSparseConfigError, effective_max_sparse_tokens

GOOD = {
    "quant_method": "rsparse",
    "format_version": 1,
    "method": "teal",
    "target_sparsity": 0.5,
    "modules": {"model.layers.0.mlp.down_proj": {"selection": "threshold", "sparsity": 0.5}},
}


def bad(**changes):
    cfg = copy.deepcopy(GOOD)
    cfg.update(changes)
    return cfg


def test_good_config_round_trips():
    parsed = RSparseCheckpointConfig.from_dict(GOOD)
    assert RSparseCheckpointConfig.from_dict(parsed.to_dict()) == parsed


@pytest.mark.parametrize(
    "cfg, message",
    [
        (bad(colour="red"), r"unknown key\(s\) \['colour'\]; allowed keys are"),
        (bad(method="magic"), r"method is 'magic'; allowed values are \['teal', 'rsparse', 'larosa', 'dense'\]"),
        (bad(target_sparsity=1.5), r"target_sparsity must be in \[0, 1\), got 1.5"),
        (bad(target_sparsity=-0.1), r"target_sparsity must be in \[0, 1\), got -0.1"),
        (bad(target_sparsity="half"), r"target_sparsity must be a number in \[0, 1\)"),
        (bad(format_version=99), r"format_version is 99; this vllm-rsparse reads format_version \[1\]"),
        (bad(quant_method="gptq"), r"quant_method is 'gptq'; expected 'rsparse'"),
        (bad(max_sparse_tokens=-2), r"max_sparse_tokens must be an integer >= 0"),
        (bad(modules={"m": {"selection": "random"}}), r"modules\['m'\].selection is 'random'; allowed values"),
        (bad(modules={"m": {"sparsity": 1.0}}), r"modules\['m'\].sparsity must be in \[0, 1\)"),
        (bad(modules={"m": {"selection": "topk"}}), r"selection 'topk' needs 'keep'"),
        (bad(modules={"m": {"rank": -1}}), r"modules\['m'\].rank must be an integer >= 0"),
        (bad(modules={"m": {"colour": 1}}), r"modules\['m'\]: unknown key\(s\) \['colour'\]"),
    ],
    ids=["unknown-key", "unknown-method", "sparsity-1.5", "sparsity-negative", "sparsity-string",
         "future-format", "other-quant-method", "max-tokens-negative", "module-selection",
         "module-sparsity-1", "topk-without-keep", "negative-rank", "module-unknown-key"],
)
def test_bad_config_is_a_clear_error(cfg, message):
    with pytest.raises(RSparseConfigError, match=message):
        RSparseCheckpointConfig.from_dict(cfg)


@pytest.mark.parametrize("value, expected", [("", 16), ("4", 4), ("all", 2**62), ("-1", 2**62)])
def test_max_sparse_tokens_override(monkeypatch, value, expected):
    monkeypatch.setenv("RSPARSE_MAX_SPARSE_TOKENS", value)
    assert effective_max_sparse_tokens(16) == expected


def test_max_sparse_tokens_override_rejects_garbage(monkeypatch):
    monkeypatch.setenv("RSPARSE_MAX_SPARSE_TOKENS", "many")
    with pytest.raises(RSparseConfigError, match="RSPARSE_MAX_SPARSE_TOKENS='many': expected an integer"):
        effective_max_sparse_tokens(16)
