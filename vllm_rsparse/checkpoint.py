"""The rsparse checkpoint on disk: tensor names, expected shapes, validation, writing.

docs/checkpoint-format.md is the prose version of this module. An rsparse checkpoint
is a Hugging Face model directory (config.json, safetensors weights, tokenizer) whose
config.json carries ``quantization_config`` and whose ``rsparse.safetensors`` carries
per-projection tensors named ``<hf module>.rsparse_<kind>``.

vLLM leaves a tensor that a quantization method declares but the checkpoint lacks
silently uninitialised, so ``validate_checkpoint`` checks names, shapes, dtypes and
finiteness up front (header + the small rsparse tensors only) and the LinearMethod
checks again what actually arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from vllm_rsparse import architectures
from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.config import RSparseCheckpointConfig

RSPARSE_FILE = "rsparse.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TENSOR_PREFIX = "rsparse_"
TENSOR_KINDS = ("threshold", "score_weight", "lowrank_up", "lowrank_down")
# The largest number of bytes a safetensors header may claim before we call the file
# corrupt instead of trying to read it (the format itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be served; the message names the file/module/tensor."""


def tensor_name(module: str, kind: str) -> str:
    return f"{module}.{TENSOR_PREFIX}{kind}"


def tensor_shape(kind: str, d_out: int, d_in: int, rank: int) -> tuple[int, ...]:
    """Shape of one projection's rsparse tensor of this kind, unsharded."""
    return {
        "threshold": (1,),
        "score_weight": (d_in,),
        "lowrank_up": (d_out, rank),
        "lowrank_down": (rank, d_in),
    }[kind]


def tensor_dtype_is_float32(kind: str) -> bool:
    # Thresholds and score weights are compared against fp32 scores: keep fp32.
    # Low-rank factors are weights: stored in the model dtype (bf16).
    return kind in ("threshold", "score_weight")


def expected_tensors(
    shapes: ModelShapes, qcfg: RSparseCheckpointConfig
) -> dict[str, tuple[int, ...]]:
    """Every rsparse tensor the config implies, name -> shape."""
    check_modules_cover_model(shapes, qcfg)
    expected: dict[str, tuple[int, ...]] = {}
    for group_name, group in architectures.iter_groups(shapes):
        settings = qcfg.modules[group_name]
        base = group_name[: -len(group.merged_name)]
        for member in group.members:
            d_out, d_in = shapes.member_shape(member)
            for kind in settings.tensor_kinds:
                expected[tensor_name(base + member, kind)] = tensor_shape(kind, d_out, d_in, settings.rank)
    return expected


def check_modules_cover_model(shapes: ModelShapes, qcfg: RSparseCheckpointConfig) -> None:
    names = {name for name, _ in architectures.iter_groups(shapes)}
    missing = sorted(names - set(qcfg.modules))
    extra = sorted(set(qcfg.modules) - names)
    if missing:
        raise CheckpointError(
            f"quantization_config.modules has no entry for {len(missing)} module(s) of this "
            f"{shapes.num_layers}-layer model, e.g. {missing[:3]}"
        )
    if extra:
        raise CheckpointError(
            f"quantization_config.modules names {len(extra)} module(s) this model does not have, "
            f"e.g. {extra[:3]}; expected names like 'model.layers.0.self_attn.qkv_proj'"
        )
    for name, group in architectures.iter_groups(shapes):
        settings = qcfg.modules[name]
        d_out, d_in = shapes.group_shape(group)
        if settings.keep is not None and settings.keep > d_in:
            raise CheckpointError(
                f"quantization_config.modules[{name!r}].keep is {settings.keep}, more than the "
                f"{d_in} input channels of that module"
            )
        if settings.rank > min(d_out, d_in):
            raise CheckpointError(
                f"quantization_config.modules[{name!r}].rank is {settings.rank}, more than "
                f"min(d_out, d_in) = {min(d_out, d_in)}"
            )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, with a clear error if it is corrupt."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: corrupted safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            size = os.fstat(f.fileno()).st_size
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupted safetensors header (claims {header_len} header bytes after the 8-byte "
                    f"length, but the file has {size} bytes in all: truncated, or not a safetensors file)"
                )
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header


def load_quantization_config(model_dir: str | os.PathLike) -> tuple[dict[str, Any], RSparseCheckpointConfig]:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json: not a Hugging Face model directory")
    hf_config = json.loads(config_path.read_text())
    if "quantization_config" not in hf_config:
        raise CheckpointError(f"{config_path}: no quantization_config: not an rsparse checkpoint")
    return hf_config, RSparseCheckpointConfig.from_dict(hf_config["quantization_config"])


def validate_checkpoint(
    model_dir: str | os.PathLike,
    hf_config: Any | None = None,
    qcfg: RSparseCheckpointConfig | None = None,
    check_values: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Check an rsparse checkpoint before anything loads it; returns the expected tensors.

    Raises CheckpointError naming the first missing/misshapen/non-finite tensor.
    Only safetensors files are read (never .bin/.pt: those could execute code).
    """
    model_dir = Path(model_dir)
    if hf_config is None or qcfg is None:
        raw_config, parsed = load_quantization_config(model_dir)
        hf_config = hf_config if hf_config is not None else raw_config
        qcfg = qcfg if qcfg is not None else parsed
    shapes = ModelShapes.from_hf_config(hf_config)
    expected = expected_tensors(shapes, qcfg)
    if not expected:
        return expected
    path = model_dir / RSPARSE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir}: {RSPARSE_FILE} is missing but quantization_config needs "
            f"{len(expected)} rsparse tensors, e.g. {next(iter(expected))!r}"
        )
    header = read_safetensors_header(path)
    for name, shape in expected.items():
        if name not in header:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {list(shape)})")
        got = tuple(header[name].get("shape", ()))
        if got != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}"
            )
    if check_values:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in expected:
                    if not torch.isfinite(f.get_tensor(name).float()).all():
                        raise CheckpointError(f"{path}: tensor {name!r} has NaN or Inf values")
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{path}: corrupted safetensors file ({e})") from None
    return expected


def safetensors_metadata(**fields: Any) -> dict[str, str]:
    """safetensors metadata must be str -> str."""
    from vllm_rsparse import __version__
    from vllm_rsparse.config import FORMAT_VERSION

    meta = {"format": "pt", "rsparse_format_version": str(FORMAT_VERSION), "package_version": __version__}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    return meta


def refuse_non_empty_output(output_dir: str | os.PathLike, force: bool) -> None:
    """A non-empty output directory is the user's data: replaced only with --force."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise CheckpointError(f"output directory {output_dir} exists and is not empty (use --force to replace it)")


def refuse_output_over_source(output_dir: str | os.PathLike, source: str | os.PathLike) -> None:
    """--force replaces the output directory, so it must not be the model being converted or a
    directory above it: that would replace the source model (for a rotated checkpoint, with weights
    it cannot be recovered from). A GGUF file's source is the directory that holds it."""
    source = Path(source).resolve()
    if not source.exists():
        return  # the model loader names the missing path (its parent is no model to protect)
    source_dir = source if source.is_dir() else source.parent
    output = Path(output_dir).resolve()
    if output == source_dir or output in source_dir.parents:
        where = "is" if output == source_dir else "contains"
        raise CheckpointError(
            f"output directory {output_dir} {where} the source model {source}; writing there would replace "
            "the model being calibrated (with or without --force): choose another output directory")


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temp dir next to output_dir; on success rename it into place.

    An interrupted run leaves at most a ``.<name>.tmp-*`` directory, which has no
    config.json at the final path and so never loads as a checkpoint.
    """
    output_dir = Path(output_dir)
    refuse_non_empty_output(output_dir, force)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is shared like any model dir
    try:
        yield tmp
        if output_dir.exists():
            # Move the old directory aside first: a crash here leaves both copies.
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / "replaced")
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    output_dir: str | os.PathLike,
    hf_config: dict[str, Any],
    qcfg: RSparseCheckpointConfig,
    weights: dict[str, torch.Tensor],
    rsparse_tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    extra_files: Iterable[Path] = (),
    force: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write a complete checkpoint atomically (see ``atomic_output_dir``)."""
    from safetensors.torch import save_file

    shapes = ModelShapes.from_hf_config(hf_config)
    expected = expected_tensors(shapes, qcfg)
    missing = sorted(set(expected) - set(rsparse_tensors))
    if missing:
        raise CheckpointError(f"internal: calibration produced no tensor {missing[0]!r}")
    with atomic_output_dir(output_dir, force) as tmp:
        meta = safetensors_metadata(**metadata)
        weight_map: dict[str, str] = {}
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        for name, tensor in weights.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor.contiguous()
            shard_bytes += nbytes
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        ordered = {name: rsparse_tensors[name].contiguous() for name in expected}
        if ordered:
            save_file(ordered, str(tmp / RSPARSE_FILE), metadata=meta)
            weight_map.update({name: RSPARSE_FILE for name in ordered})
        total = sum(t.numel() * t.element_size() for t in list(weights.values()) + list(ordered.values()))
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        config = dict(hf_config)
        config["quantization_config"] = qcfg.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for src in extra_files:
            shutil.copy2(src, tmp / Path(src).name)
        validate_checkpoint(tmp)
    return Path(output_dir)
