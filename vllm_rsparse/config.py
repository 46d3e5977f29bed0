"""Typed rsparse configuration: the ``quantization_config`` block of config.json.

Pure Python (no vLLM import) so calibration, validation and tests share it.
docs/checkpoint-format.md documents every field; the error messages here name the
offending key and the allowed values, because a bad config must be a clear error
at load time, not a traceback from inside vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

QUANT_METHOD = "rsparse"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
METHODS = ("teal", "rsparse", "larosa", "dense")
SELECTIONS = ("threshold", "topk", "dense")
DEFAULT_MAX_SPARSE_TOKENS = 16

# Environment override of max_sparse_tokens for serving/evaluation. "all" (or any
# negative number) forces the sparse path for every token count: quality evaluation
# needs it, since prompts are prefill and would otherwise run dense.
MAX_SPARSE_TOKENS_ENV = "RSPARSE_MAX_SPARSE_TOKENS"
ALL_TOKENS = 2**62


class RSparseConfigError(ValueError):
    """A quantization_config that cannot be served; the message names the key."""


def _check_keys(where: str, given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RSparseConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}"
        )


def _check_sparsity(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RSparseConfigError(f"{where} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise RSparseConfigError(f"{where} must be in [0, 1), got {value}")
    return float(value)


def _check_int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RSparseConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModuleSettings:
    """How one input group (qkv, o, gate_up or down of one layer) is sparsified.

    q/k/v (and gate/up) read the same input, so they share one mask, one threshold
    and one low-rank term: settings are per group, keyed by vLLM's merged name.
    """

    selection: str = "threshold"  # "threshold" (TEAL, R-Sparse), "topk" (LaRoSA), "dense"
    sparsity: float = 0.0  # target fraction of this group's weight bytes not read
    input_sparsity: float = 0.0  # target fraction of input channels skipped
    keep: int | None = None  # topk: channels kept per token (exact)
    rank: int = 0  # R-Sparse low-rank term; 0 = none
    score_weight: bool = False  # score = |x| * per-channel weight (column norms)

    FIELDS = ("selection", "sparsity", "input_sparsity", "keep", "rank", "score_weight")

    @classmethod
    def from_dict(cls, name: str, raw: Any) -> "ModuleSettings":
        where = f"quantization_config.modules[{name!r}]"
        if not isinstance(raw, dict):
            raise RSparseConfigError(f"{where} must be an object, got {type(raw).__name__}")
        _check_keys(where, raw, cls.FIELDS)
        selection = raw.get("selection", "threshold")
        if selection not in SELECTIONS:
            raise RSparseConfigError(
                f"{where}.selection is {selection!r}; allowed values are {list(SELECTIONS)}"
            )
        keep = raw.get("keep")
        if selection == "topk":
            if keep is None:
                raise RSparseConfigError(f"{where}: selection 'topk' needs 'keep' (channels per token)")
            keep = _check_int(f"{where}.keep", keep, 0)
        elif keep is not None:
            raise RSparseConfigError(f"{where}: 'keep' is only valid with selection 'topk'")
        score_weight = raw.get("score_weight", False)
        if not isinstance(score_weight, bool):
            raise RSparseConfigError(f"{where}.score_weight must be true or false, got {score_weight!r}")
        return cls(
            selection=selection,
            sparsity=_check_sparsity(f"{where}.sparsity", raw.get("sparsity", 0.0)),
            input_sparsity=_check_sparsity(f"{where}.input_sparsity", raw.get("input_sparsity", 0.0)),
            keep=keep,
            rank=_check_int(f"{where}.rank", raw.get("rank", 0), 0),
            score_weight=score_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "selection": self.selection,
            "sparsity": round(self.sparsity, 6),
            "input_sparsity": round(self.input_sparsity, 6),
            "rank": self.rank,
            "score_weight": self.score_weight,
        }
        if self.keep is not None:
            out["keep"] = self.keep
        return out

    @property
    def tensor_kinds(self) -> tuple[str, ...]:
        """The rsparse tensors a projection of this group carries in the checkpoint."""
        kinds = []
        if self.selection == "threshold":
            kinds.append("threshold")
        if self.score_weight:
            kinds.append("score_weight")
        if self.rank > 0:
            kinds += ["lowrank_up", "lowrank_down"]
        return tuple(kinds)


@dataclasses.dataclass(frozen=True)
class RSparseCheckpointConfig:
    """The whole quantization_config of an rsparse checkpoint."""

    method: str
    target_sparsity: float
    modules: dict[str, ModuleSettings]
    format_version: int = FORMAT_VERSION
    max_sparse_tokens: int = DEFAULT_MAX_SPARSE_TOKENS
    rotation: str | None = None  # "global": a PCA rotation folded into the weights offline
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    TOP_KEYS = (
        "quant_method",
        "format_version",
        "method",
        "target_sparsity",
        "max_sparse_tokens",
        "rotation",
        "modules",
        "calibration",
    )

    @classmethod
    def from_dict(cls, raw: Any) -> "RSparseCheckpointConfig":
        if not isinstance(raw, dict):
            raise RSparseConfigError(f"quantization_config must be an object, got {type(raw).__name__}")
        _check_keys("quantization_config", raw, cls.TOP_KEYS)
        quant_method = raw.get("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise RSparseConfigError(
                f"quantization_config.quant_method is {quant_method!r}; expected {QUANT_METHOD!r}"
            )
        version = raw.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise RSparseConfigError(
                f"quantization_config.format_version is {version!r}; this vllm-rsparse reads "
                f"format_version {list(SUPPORTED_FORMAT_VERSIONS)} (a newer version needs a newer vllm-rsparse)"
            )
        method = raw.get("method")
        if method not in METHODS:
            raise RSparseConfigError(
                f"quantization_config.method is {method!r}; allowed values are {list(METHODS)}"
            )
        rotation = raw.get("rotation")
        if rotation not in (None, "global"):
            raise RSparseConfigError(
                f"quantization_config.rotation is {rotation!r}; allowed values are [null, 'global']"
            )
        modules_raw = raw.get("modules")
        if not isinstance(modules_raw, dict):
            raise RSparseConfigError("quantization_config.modules must be an object keyed by module name")
        calibration = raw.get("calibration", {})
        if not isinstance(calibration, dict):
            raise RSparseConfigError("quantization_config.calibration must be an object")
        return cls(
            method=method,
            target_sparsity=_check_sparsity(
                "quantization_config.target_sparsity", raw.get("target_sparsity")
            ),
            modules={name: ModuleSettings.from_dict(name, m) for name, m in modules_raw.items()},
            format_version=version,
            max_sparse_tokens=_check_int(
                "quantization_config.max_sparse_tokens",
                raw.get("max_sparse_tokens", DEFAULT_MAX_SPARSE_TOKENS),
                0,
            ),
            rotation=rotation,
            calibration=calibration,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "max_sparse_tokens": self.max_sparse_tokens,
            "rotation": self.rotation,
            "calibration": self.calibration,
            "modules": {name: s.to_dict() for name, s in self.modules.items()},
        }


def env_switch(name: str) -> bool:
    """An on/off environment variable: unset, "", "0", "false", "off" -> off; "1", "true",
    "on" -> on; anything else is an error that names the variable and the value."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "off"):
        return False
    if raw in ("1", "true", "on"):
        return True
    raise RSparseConfigError(f"{name}={raw!r}: expected 1 (on) or 0 (off)")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """An environment variable naming one of `choices` (case and surrounding blanks ignored);
    unset or "" -> default; anything else is an error that names the variable, the value and
    the choices."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise RSparseConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def max_sparse_tokens_overridden() -> bool:
    """Whether RSPARSE_MAX_SPARSE_TOKENS sets the limit (an explicit user decision)."""
    return bool(os.environ.get(MAX_SPARSE_TOKENS_ENV, "").strip())


def effective_max_sparse_tokens(configured: int) -> int:
    """max_sparse_tokens after the RSPARSE_MAX_SPARSE_TOKENS override, if set."""
    raw = os.environ.get(MAX_SPARSE_TOKENS_ENV)
    if raw is None or raw.strip() == "":
        return configured
    value = raw.strip().lower()
    if value == "all":
        return ALL_TOKENS
    try:
        parsed = int(value)
    except ValueError:
        raise RSparseConfigError(
            f"{MAX_SPARSE_TOKENS_ENV}={raw!r}: expected an integer >= 0 or 'all'"
        ) from None
    return ALL_TOKENS if parsed < 0 else parsed
