"""Host launchers for the Triton kernels in kernels/ (vllm_rsparse.kernels).

Three layers are kept apart: the @triton.jit kernels (kernels/*.py); this module,
which validates, allocates, picks a block config from the committed tables and
launches; and the LinearMethod, which only decides. Everything here runs on
shapes, dtypes and Python ints only: no host sync, static output shapes, no
autotuning at call time, so the calls are CUDA-graph safe.

What the LinearMethod must do:
  * call ``prepare_weight`` on the weight (and on lowrank_down) once in
    process_weights_after_loading; the kernels read [K, N] storage with unit
    stride along N (a weight that is not prepared still works, but is copied
    on every call, with a warning);
  * pass fp16 or bf16 activations; weights and low-rank factors of the same dtype;
  * optionally cap its max_sparse_tokens with ``crossover_tokens`` (its sparsity is
    known to it, not to the op).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
import warnings
from importlib import resources

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Decode rows in one launch: the union kernel pads rows to this (tl.dot needs >= 16).
MAX_ROWS = 16
# Row groups of the union compact kernel without tl.dot (FMAs on a register tile, session 20):
# a 2-token step pays for 2 rows, not 16, and its loop is the one-row compact kernel's pipeline.
UNION_FMA_ROWS = (2, 4)
# Their loop is pipelined by hand: GemvConfig.num_stages is the number of list steps whose gathers
# are in flight while a step's FMAs run (launchers.fma_ahead_steps).
FMA_AHEAD_STEPS = (1, 2)
# M > 1 decode rows run as one program per row ("per-row", ROWS = 1: each row reads the weight
# rows of its own channels) or all rows in one program ("union", ROWS = MAX_ROWS, tl.dot: a
# weight row is read once if any row selected its channel). Which one a (shape, token count,
# sparsity band) uses is its committed config's `rows` (sparse_gemv.json, measured side by side
# by benchmarks/gpu/union_rows.py): "table". "on" runs every M > 1 launch as union (committed
# union config, else the heuristic's), "off" every one per-row -- for tests (the union kernel on
# every shape and token count) and A/B runs (bench_e2e.py's per-config switches).
# The union program failed GPU tests on its first H100 run (e2a1af1, kernel_tests_union_h100.log); it
# was off until session 16 re-ran the whole M > 1 set with it (docs/kernels.md).
UNION_ROWS_MODES = ("table", "on", "off")
UNION_ROWS_DEFAULT = "table"
UNION_ROWS_ENV = "RSPARSE_UNION_ROWS"
# None: RSPARSE_UNION_ROWS (one of UNION_ROWS_MODES; unset: UNION_ROWS_DEFAULT)
UNION_ROWS: str | None = None
# One-row programs come in two kernels: the walk over every K row of a split
# (sparse_gemv_kernel, ROWS = 1) and the compact list of the selected channels
# (sparse_gemv_compact_kernel). Which one a shape uses is part of its committed config
# (GemvConfig.kernel, chosen by `bench_kernels.py --graph-sweep`); shapes without one get
# the walk. True forces the compact kernel for every one-row launch (tests).
COMPACT_ROWS_ENABLED = False
# One-row loops load the next-but-one step's x (walk) or list entries (compact) before
# the current step's FMAs, so each step's weight-row loads issue without waiting for the
# load they are predicated or indexed on. False: the previous one-step-ahead loop (kept
# so `bench_kernels.py --graph-sweep` times both in one run; tests run both).
LOAD_AHEAD_ENABLED = True
# Split-K finish (kernels/sparse_gemv.py docstring). Fixed point: one returning 64-bit
# atomic per output element and program, which also counts the arrivals, so the program
# that completes an element writes it (no per-tile counter, fence or reload; results
# bit-identical between runs); used up to FX_MAX_SPLIT programs along K. Counter: f32
# atomics, then a per-tile arrival counter and the last program's reload; deeper splits,
# and every split when False (kept so benchmarks time both in one run; tests run both).
FIXED_POINT_SPLIT_ENABLED = True
FX_MAX_SPLIT = 63  # the word's 6 arrival bits (kernels/sparse_gemv.py FX_MAX_SPLIT); a wide
# word for deeper splits measured slower than the counter there (kernels/sparse_gemv.py docstring)
# Programmatic dependent launch (compute capability >= 9, CUDA): the GEMV and low-rank
# kernels are launched with launch_pdl, so their programs may be scheduled while the kernel
# before them in the stream is still finishing (the launch latency, ~1-2 us of a 10-30 us
# GEMV, overlaps it). Every program first waits (griddepcontrol.wait) until that kernel has
# completed and its writes are visible -- x, thresholds and the split-K workspace are read
# only after it -- then lets its own dependents launch. None: RSPARSE_PDL (1 on, 0 / unset
# off); the interpreter and older GPUs never use it.
PDL_ENV = "RSPARSE_PDL"
PDL_ENABLED: bool | None = None
_pdl_capable: dict[torch.device, bool] = {}
# Weight rows are read once per launch: with an evict-first hint (GemvConfig.evict, per
# committed config) they leave L2 before what the programs re-read there (x, the channel
# lists, the split-K workspace words), which a 50-230 MB weight stream would otherwise push
# out between uses. Measured per config: -2..-4% on the 4-warp compact configs at s = 0.5,
# +40-50% on the 2-warp ones (fixed_cost_head_evict_h200.json). True forces it on every
# launch (benchmarks/gpu/fixed_cost.py "+evict"). The hint changes no result bit: where the
# split-K sum is order-independent (fixed point, no split) outputs are identical either way.
WEIGHT_EVICT_FIRST = False
# Split-K workspace, per device, zero between launches (the kernel re-zeroes what it
# used): arrival counters, one per (tile, row group), an f32 accumulator and an int64
# fixed-point accumulator of MAX_ROWS x WORKSPACE_COLS (4 + 8 MiB); N + r of a layer must
# fit in WORKSPACE_COLS.
COUNTER_SLOTS = 1 << 16
WORKSPACE_COLS = 1 << 16
# Channel-list scratch of the one-row (compact) programs: per row, the selected and the
# dropped channels' indices, int32 [2 * MAX_ROWS, WORKSPACE_COLS] (8 MiB); K <= WORKSPACE_COLS.
LIST_ROWS = 2 * MAX_ROWS
# K chunk of one compact program: a power of two (tl.arange); at least a few list
# steps' worth, at most what one program holds in registers as one x vector.
MIN_CHUNK = 16
MAX_CHUNK = 4096
# Selections of the op (ops.THRESHOLD_SELECTION is keep == -1).
THRESHOLD_SELECTION = -1

_CONFIG_FILE = "sparse_gemv.json"
_DISPATCH_FILE = "dispatch.json"
# A folder of tables tuned on the user's own GPU (what the benchmarks/gpu scripts' --adopt / --merge
# write; README, "Serving knobs"): a table found there replaces the package's. The variable is looked up
# on every read, each folder's tables are read from disk once per process.
CONFIG_DIR_ENV = "RSPARSE_CONFIG_DIR"
_workspaces: dict[torch.device, "Workspace"] = {}
_warned_layout = False


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors, in f32 only."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pdl_requested() -> bool:
    """PDL_ENABLED, or RSPARSE_PDL when it is None: unset / "0" off, "1" on, anything else an error."""
    if PDL_ENABLED is not None:
        return PDL_ENABLED
    from vllm_rsparse.config import env_switch

    return env_switch(PDL_ENV)


def pdl_capable(device: torch.device) -> bool:
    """Whether kernels on this device can be launched with programmatic dependent launch (a CUDA
    GPU of compute capability >= 9, not the interpreter)."""
    if interpreting() or device.type != "cuda":
        return False
    if device not in _pdl_capable:
        _pdl_capable[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _pdl_capable[device]


def use_pdl(device: torch.device) -> bool:
    """Launch every kernel with programmatic dependent launch on this device (pdl_requested and
    pdl_capable)."""
    return pdl_requested() and pdl_capable(device)


# R-Sparse's up-projection term z u^T (z = V((1 - m) x)) on the compact kernel: the v_t programs
# share the main grid and write z, the w_t programs write y32, and lowrank_up_kernel adds z u^T in a
# second launch after it (2.4-4.6 us a module on the H200, most of what R-Sparse loses to TEAL;
# lowrank_h200.md). Two ways without the second launch were built, measured slower and removed
# in session 25 (the code is at b21387c):
#   "fused"  a z launch of the v_t programs alone, then the TEAL grid, whose w_t programs each
#            added their slice of z u^T before the split-K finish. On the H200 (session 12,
#            lowrank_epilogue_h200.md) it saved 0.2-1 us on four shapes and lost 1.4-4.8 us on
#            Llama-2 qkv and Llama-3 gate_up / down; end to end R-Sparse 0.5 went from 1.25x / 1.22x
#            to 1.24x / 1.11x (Llama-2 / Llama-3): the z launch's few v_t programs are latency-bound.
#   "claim"  one launch at one token: a w_t program that found z incomplete computed every v_t item
#            nobody had claimed yet, then waited (sessions 13-14, lowrank_epilogue_claim_h200.md):
#            7-32 us more per module, because every w_t program waits for the slowest v_t item;
#            R-Sparse 0.5 end to end 0.91x / 0.83x.
# The epilogue launch with PDL (where the GPU has it): the main kernel's programs
# let it start at once, so its launch latency (most of its 2.4-5 us) overlaps the main kernel,
# and its programs wait for the main kernel only before their first load. Its programs can be
# scheduled only once every main program has started, so they never delay one. Measured in
# session 13 on the H200 with no end-to-end gain (benchmarks/results/e2e_h200_rsparse.md runs 8-11,
# lowrank_epilogue_pdl_h200.md): off by default. None: RSPARSE_LOWRANK_UP_PDL (1 on, 0 / unset off).
LOWRANK_UP_PDL_ENV = "RSPARSE_LOWRANK_UP_PDL"
LOWRANK_UP_PDL: bool | None = None


def union_rows_mode() -> str:
    """UNION_ROWS (tests and benchmarks set it), or RSPARSE_UNION_ROWS when it is None (unset:
    UNION_ROWS_DEFAULT); a name that is not a mode is an error that names it."""
    if UNION_ROWS is not None:
        if UNION_ROWS not in UNION_ROWS_MODES:
            raise ValueError(f"launchers.UNION_ROWS must be one of {UNION_ROWS_MODES}, got {UNION_ROWS!r}")
        return UNION_ROWS
    from vllm_rsparse.config import env_choice

    return env_choice(UNION_ROWS_ENV, UNION_ROWS_MODES, UNION_ROWS_DEFAULT)


def lowrank_up_pdl_requested() -> bool:
    """LOWRANK_UP_PDL, or RSPARSE_LOWRANK_UP_PDL when it is None: unset / "0" off, "1" on,
    anything else an error."""
    if LOWRANK_UP_PDL is not None:
        return LOWRANK_UP_PDL
    from vllm_rsparse.config import env_switch

    return env_switch(LOWRANK_UP_PDL_ENV)


def lowrank_up_pdl(device: torch.device) -> bool:
    """Whether the epilogue launch after a compact kernel is launched with PDL on this device."""
    return lowrank_up_pdl_requested() and pdl_capable(device)


# ---------------------------------------------------------------------------
# committed data: block configs and the sparse/dense crossover
# ---------------------------------------------------------------------------


KERNELS = ("walk", "compact")
LOWRANK_LAYOUTS = ("w_tiles", "own_tiles", "wide_chunks")  # the v_t programs' layouts (lowrank_tile)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of sparse_gemv_kernel for one (shape, token count).

    rows: rows per program; 1 = one program per row ("per-row": each row reads its own
    channels), 16 = all rows in one program ("union": a weight row is read once if any
    row needs it; tl.dot), 2 / 4 = union programs of that many rows with FMAs
    (UNION_FMA_ROWS; compact kernel only). split_k: programs along K.
    """

    rows: int
    block_n: int
    block_k: int
    split_k: int  # compact: K chunk = next_pow2(cdiv(K, split_k)) in [MIN_CHUNK, MAX_CHUNK]
    num_warps: int
    num_stages: int
    # "walk" (every K row of the split, predicated) or "compact" (a list of the selected rows);
    # rows > 1 with "compact": the union compact kernel (a list of the rows selected by any row;
    # no low-rank term: with one, the walk)
    kernel: str = "walk"
    evict: bool = False  # evict-first hint on the weight rows (WEIGHT_EVICT_FIRST)
    # compact kernel with a low-rank term: the v_t programs' layout (LOWRANK_LAYOUTS; "" = the
    # default, wide_chunks), chosen per shape by benchmarks/gpu/lowrank_time.py
    lowrank: str = ""

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"GemvConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.lowrank not in ("", *LOWRANK_LAYOUTS):
            raise ValueError(f"GemvConfig.lowrank must be one of {LOWRANK_LAYOUTS} or empty, got {self.lowrank!r}")
        if self.rows not in (1, MAX_ROWS, *UNION_FMA_ROWS):
            raise ValueError(f"GemvConfig.rows must be 1, {MAX_ROWS} or one of {UNION_FMA_ROWS}, got {self.rows}")
        if self.rows in UNION_FMA_ROWS and self.kernel != "compact":
            raise ValueError(f"GemvConfig.rows = {self.rows} (no tl.dot) needs kernel='compact', got {self.kernel!r}")
        if self.rows in UNION_FMA_ROWS and self.num_stages not in FMA_AHEAD_STEPS:
            raise ValueError(f"GemvConfig.num_stages of an FMA union (rows = {self.rows}) is its hand pipeline's "
                             f"depth, one of {FMA_AHEAD_STEPS}; got {self.num_stages}")

    @classmethod
    def from_dict(cls, raw: dict) -> "GemvConfig":
        ints = {f.name: int(raw[f.name]) for f in dataclasses.fields(cls) if f.type in ("int", int)}
        return cls(**ints, kernel=str(raw.get("kernel", "walk")), evict=bool(raw.get("evict", False)),
                   lowrank=str(raw.get("lowrank", "")))


def _load_json(name: str) -> dict:
    """A table of kernels/configs: $RSPARSE_CONFIG_DIR's when that folder has it, else the package's
    ({} where neither has one: the heuristics)."""
    return _load_table(name, os.environ.get(CONFIG_DIR_ENV) or None)[1]


def _table_source(name: str) -> str:
    """Where _load_json's table `name` was read from: the folder's file, else the package's name."""
    return _load_table(name, os.environ.get(CONFIG_DIR_ENV) or None)[0]


@functools.lru_cache(maxsize=None)
def _load_table(name: str, folder: str | None) -> tuple[str, dict]:
    """(the file read, its table)."""
    if folder:
        # a mistyped folder would otherwise serve the package's tables without a word
        if not os.path.isdir(folder):
            raise ValueError(f"{CONFIG_DIR_ENV}={folder!r} is not a folder; unset it to use the package's tables")
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                return path, _parse_table(f.read(), path)
    try:
        text = resources.files("vllm_rsparse.kernels").joinpath("configs", name).read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return name, {}
    return name, _parse_table(text, name)


def check_tables() -> None:
    """Reads both tables as the workers will (the package's, or $RSPARSE_CONFIG_DIR's) and checks every
    entry in them, so that a bad folder or a hand-edited table fails up front with its name, not in a
    worker's first decode step. Reads no GPU state (the front end must not initialize CUDA)."""
    for name, check in ((_CONFIG_FILE, _check_config_entries), (_DISPATCH_FILE, _check_ratio_entries)):
        where = _table_source(name)
        try:
            check(_load_json(name))
        except _TableEntryError as err:
            raise ValueError(f"rsparse kernel table {where}: {err}") from None


class _TableEntryError(Exception):
    pass


def _entries(node, depth: int, path: str):
    """(path, leaf) of the objects nested `depth` levels below node; a level that is no object is an error."""
    if depth == 0:
        yield path, node
        return
    if not isinstance(node, dict):
        raise _TableEntryError(f"{path} must be a JSON object, got {node!r:.80}")
    for key, child in node.items():
        yield from _entries(child, depth - 1, f"{path}/{key}")


def _scopes(table: dict):
    """The table's own entries and each GPU's under "by_gpu", with the path prefix that names them."""
    yield "", table
    for gpu_path, per_gpu in _entries(table.get("by_gpu", {}), 1, "by_gpu"):
        if not isinstance(per_gpu, dict):
            raise _TableEntryError(f"{gpu_path} must be a JSON object, got {per_gpu!r:.80}")
        yield gpu_path + "/", per_gpu


def _check_config_entries(table: dict) -> None:
    for scope, part in _scopes(table):
        for band in ("configs", "configs_high"):
            for path, raw in _entries(part.get(band, {}), 2, scope + band):
                try:
                    int(path.rsplit("/", 1)[1])  # the token count
                    GemvConfig.from_dict(raw)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    raise _TableEntryError(f"{path} is not a config ({type(err).__name__}: {err})") from None


def _check_ratio_entries(table: dict) -> None:
    for scope, part in _scopes(table):
        for path, ratio in _entries(part.get("ratios", {}), 4, scope + "ratios"):
            level, tokens = path.split("/")[-2:]
            try:
                valid = float(level) >= 0 and int(tokens) >= 1 and isinstance(ratio, (int, float))
            except ValueError:
                valid = False
            if not valid:
                raise _TableEntryError(f"{path} = {ratio!r} is not a sparse / dense time ratio of a sparsity level "
                                       "and a token count (ratios/selection/shape/level/tokens)")


def tables_note(gpu: str) -> tuple[bool, str]:
    """(whether `gpu` has measurements of its own in the tables in force, one line saying where its
    configs and dispatch ratios come from): the line the LinearMethod logs once per worker."""
    own, parts = False, []
    for name in (_CONFIG_FILE, _DISPATCH_FILE):
        table = _load_json(name)
        beside = [g for g in table.get("by_gpu", {}) if g != table.get("gpu")]
        where = f"{_table_source(name)} measured on {table.get('gpu') or 'no GPU'}"
        if beside:
            where += f", with entries re-measured on {' and '.join(beside)}"
        if gpu == table.get("gpu"):
            where += " (this GPU's own)"
        elif gpu in beside:
            where += " (this GPU reads its entries where they exist)"
        own = own or gpu == table.get("gpu") or gpu in beside
        parts.append(where)
    line = f"rsparse kernel tables on {gpu}: " + "; ".join(parts)
    if own:
        return True, line
    return False, (line + f". This GPU has no entries of its own: it runs another GPU's tile configs and "
                   f"dense/sparse choices, which may leave a shape on the slower path. To measure it, see "
                   f"{CONFIG_DIR_ENV} in the README.")


def _parse_table(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"rsparse kernel table {where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"rsparse kernel table {where} must hold a JSON object, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=None)
def _gpu_name() -> str | None:
    """The name of the CUDA device this process runs on (torch.cuda.get_device_name), or None on the
    CPU / under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def _table_and_overlay(name: str, gpu: str | None) -> tuple[dict, dict | None]:
    """A committed table and its entries re-measured on `gpu` (default: this process's), if any."""
    data = _load_json(name)
    return data, data.get("by_gpu", {}).get(gpu if gpu is not None else _gpu_name())


def entry_for_gpu(table: dict, gpu: str | None) -> dict:
    """Where a measurement made on `gpu` goes in a table (the writers' side of _table_and_overlay): the
    table itself on its own GPU (or when the table or the run names none), else the table's "by_gpu"
    entry for that GPU, created if missing, which dispatch_table / config_table read on that GPU only."""
    if gpu is None or table.get("gpu") in (None, gpu):
        return table
    return table.setdefault("by_gpu", {}).setdefault(gpu, {})


# Where a writer's note on a selection's measurement goes: in a by_gpu entry under "notes"
# {selection: note}; in the table's own entries under these keys, older than the by_gpu entries.
_MAIN_NOTE_KEYS = {"threshold": "union_note", "threshold_lowrank": "lowrank_note", "topk": "topk_note"}


def put_note(table: dict, entry: dict, selection: str, note: str) -> None:
    """Record `note` on `selection`'s entries in `entry` (entry_for_gpu(table, gpu)): the table's own key
    for it (_MAIN_NOTE_KEYS) where the entry is the table itself, else the entry's "notes"."""
    if entry is table:
        table[_MAIN_NOTE_KEYS[selection]] = note
    else:
        entry.setdefault("notes", {})[selection] = note


class _TableMemo:
    """Values derived from one table object, dropped as soon as the table in force is another object
    (a new $RSPARSE_CONFIG_DIR, a test's own table). Outside CUDA graphs the op looks up its config
    and its dense/sparse limit on every call; merging a GPU's by_gpu entries and walking the ratios
    again each time cost ~22 us of Python per module call (measured in session 33 on a development
    CPU; 6 us with the memo), of the order of the GEMV it launches (10-80 us). The derived values are
    read-only: configs are frozen, tables never written through these views."""

    def __init__(self):
        self.sources: tuple = ()
        self.values: dict = {}

    def get(self, sources: tuple, key, compute):
        if len(sources) != len(self.sources) or any(a is not b for a, b in zip(sources, self.sources)):
            self.sources, self.values = sources, {}
        try:
            return self.values[key]
        except KeyError:
            value = self.values[key] = compute()
            return value


# (table, one GPU's entries in it) -> the merged view that GPU reads, one memo per file
_MERGED_DISPATCH = _TableMemo()
_MERGED_CONFIGS = _TableMemo()
_PICKED_CONFIGS = _TableMemo()  # config table in force -> pick_config's answers
_CROSSOVERS = _TableMemo()  # dispatch table in force -> crossover_tokens' answers
_LOWRANK_ROWS = _TableMemo()  # dispatch table in force -> lowrank_rows_one_token's answers


def dispatch_table(gpu: str | None = None) -> dict:
    """kernels/configs/dispatch.json as this GPU should read it.

    The table was measured on one GPU (its "gpu"). A selection re-measured on another GPU is kept
    beside it under "by_gpu" {device name: {"crossover": {selection: ...}, "ratios": {...}}}, and on
    that GPU replaces the main entries of its selections: the crossover is a property of the GPU (its
    memory bandwidth against the kernels' fixed cost), so one GPU's measurement must not send another
    GPU's modules to the slower path. gpu: a device name (default: this process's)."""
    data, overlay = _table_and_overlay(_DISPATCH_FILE, gpu)
    if not overlay:
        return data
    return _MERGED_DISPATCH.get((data, overlay), "view", lambda: _merged_dispatch(data, overlay))


def _merged_dispatch(data: dict, overlay: dict) -> dict:
    out = dict(data)
    for part in ("crossover", "ratios"):
        out[part] = {**data.get(part, {}), **overlay.get(part, {})}
    return out


def config_table(gpu: str | None = None) -> dict:
    """kernels/configs/sparse_gemv.json as this GPU should read it.

    The table was swept on one GPU (its "gpu"). Configs re-measured on another GPU are kept beside
    it under "by_gpu" {device name: {"configs": {shape: {tokens: config}}, "configs_high": ...,
    "high_from": {shape: sparsity}}}, and on that GPU replace the main table's entries one (shape,
    token count) at a time: the same SASS runs on every sm_90 card, but the best tiling depends on
    the memory bandwidth it has to keep busy (an H100 streams 30% fewer bytes per microsecond than
    the H200 the table was swept on). gpu: a device name (default: this process's)."""
    data, overlay = _table_and_overlay(_CONFIG_FILE, gpu)
    if not overlay:
        return data
    return _MERGED_CONFIGS.get((data, overlay), "view", lambda: _merged_configs(data, overlay))


def _merged_configs(data: dict, overlay: dict) -> dict:
    out = dict(data)
    for band in ("configs", "configs_high"):
        merged = {key: dict(per_shape) for key, per_shape in data.get(band, {}).items()}
        for key, per_shape in overlay.get(band, {}).items():
            merged.setdefault(key, {}).update(per_shape)
        out[band] = merged
    out["high_from"] = {**data.get("high_from", {}), **overlay.get("high_from", {})}
    return out


def _shape_key(n: int, k: int) -> str:
    return f"N{n}_K{k}"


def _bucket(tokens: int, measured: list[int]) -> int:
    """The smallest measured token count >= tokens (the largest if none)."""
    at_least = [t for t in sorted(measured) if t >= tokens]
    return at_least[0] if at_least else max(measured)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Heuristic for shapes with no committed config: enough programs to keep every SM
# busy with several tiles in flight (memory-bound GEMV), rows of >= 256 bytes.
_DEFAULT_BLOCK_N = 128
_DEFAULT_BLOCK_K = 64
_PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 4  # the interpreter runs programs one by one: split little


def default_config(n: int, k: int, tokens: int, rank: int, device: torch.device) -> GemvConfig:
    # per-row unless union is forced: a shape nobody measured gets the path with no union loss
    rows = MAX_ROWS if tokens > 1 and union_rows_mode() == "on" else 1
    block_n = _DEFAULT_BLOCK_N
    block_k = _DEFAULT_BLOCK_K
    sms = _sm_count(device.index or 0) if device.type == "cuda" else _INTERPRETER_SMS
    tiles = triton_cdiv(n, block_n) + triton_cdiv(rank, block_n)
    split_k = max(1, min(triton_cdiv(k, block_k), triton_cdiv(_PROGRAMS_PER_SM * sms, tiles)))
    return GemvConfig(rows, block_n, block_k, split_k, num_warps=4, num_stages=2)


# Modules calibrated at this input sparsity or above run the configs tuned at s = 0.9
# ("configs_high" of sparse_gemv.json): with a tenth of the rows selected the best tiling
# differs (more, shorter programs); below it the configs tuned at the design sparsity 0.5.
# A shape whose two configs were timed against each other over the sparsity range has its own
# measured boundary ("high_from" of sparse_gemv.json, benchmarks/gpu/fixed_cost.py --band-table):
# the high band's short chunks and wide tiles leave too few programs to stream many rows, so on
# some shapes it only wins from 0.8-0.9 on.
HIGH_SPARSITY_FROM = 0.7


def high_sparsity_from(n: int, k: int, table: dict | None = None) -> float:
    """The module sparsity from which shape (N, K) runs the configs ranked at 0.9 (table: config_table()
    when the caller already has it)."""
    table = config_table() if table is None else table
    return float(table.get("high_from", {}).get(_shape_key(n, k), HIGH_SPARSITY_FROM))


def pick_config(n: int, k: int, tokens: int, rank: int, device: torch.device,
                sparsity: float | None = None, gpu: str | None = None) -> GemvConfig:
    """Committed config for (N, K) at the nearest measured token count and the module's
    sparsity band (None: the design band), else the heuristic. gpu: the device name whose
    tables to read (default: this process's; a script reading another GPU's measurements on the
    CPU names that GPU)."""
    if device.type != "cuda":
        return default_config(n, k, tokens, rank, device)
    table = config_table(gpu)
    mode = union_rows_mode() if tokens > 1 else "table"
    cfg = _PICKED_CONFIGS.get((table,), (n, k, tokens, sparsity, mode),
                              lambda: _committed_config(table, n, k, tokens, sparsity, mode))
    # the heuristic is not memoized: it reads the device (SM count), not the table
    return cfg or default_config(n, k, tokens, rank, device)


def _committed_config(table: dict, n: int, k: int, tokens: int, sparsity: float | None,
                      mode: str) -> GemvConfig | None:
    """The committed config of `table` (config_table) that pick_config runs in union mode `mode`
    (union_rows_mode), or None where the heuristic decides."""
    high = sparsity is not None and sparsity >= high_sparsity_from(n, k, table)
    band = "configs_high" if high else "configs"
    per_shape = table.get(band, {}).get(_shape_key(n, k)) or table.get("configs", {}).get(_shape_key(n, k))
    if per_shape:
        measured = [int(t) for t in per_shape]
        cfg = GemvConfig.from_dict(per_shape[str(_bucket(tokens, measured))])
        if cfg.rows > 1 and mode == "off":
            # per-row programs: the shape's one-token config, one row group per token
            cfg = GemvConfig.from_dict(per_shape[str(_bucket(1, measured))])
        elif cfg.rows == 1 and mode == "on":
            # the shape's committed union config nearest in token count, else the heuristic's
            unions = [t for t in measured if t > 1 and per_shape[str(t)]["rows"] > 1]
            if not unions:
                return None
            cfg = GemvConfig.from_dict(per_shape[str(min(unions, key=lambda t: abs(t - tokens)))])
        if tokens > 1 or cfg.rows == 1:
            return cfg
    return None


def crossover_tokens(n: int, k: int, selection: str = "threshold", sparsity: float = 0.5,
                     lowrank: bool = False) -> int | None:
    """Largest token count up to which the sparse kernel beats dense cuBLAS for this shape
    at this sparsity, from the committed benchmark (kernels/configs/dispatch.json, as
    dispatch_table reads it for this GPU).
    None when the shape was not measured. The LinearMethod knows its module's sparsity and
    caps max_sparse_tokens with it.

    lowrank: the module also runs R-Sparse's low-rank term, which costs a second kernel and
    the factor reads; its own measured table (selection + "_lowrank") decides where one
    exists for the shape, else the plain table.

    With measured ratios (sparse/dense time per sparsity level and token count), the ratio
    at `sparsity` is interpolated linearly between the two measured levels around it (the
    bytes read, and so the time, fall linearly with sparsity); a module at 0.4 between
    levels 0 and 0.5 is not sent to dense just because s = 0 loses. Without ratios: the
    crossover of the nearest measured level not above `sparsity`."""
    data = dispatch_table()
    return _CROSSOVERS.get((data,), (n, k, selection, sparsity, lowrank),
                           lambda: _table_crossover(data, n, k, selection, sparsity, lowrank))


# The low-rank term's table at more than one token holds two ways to run a step (lowrank_time.py
# --tokens): ratios[selection + "_lowrank"] with the shape's committed config for that token count
# (ranked by the sweeps without the term), and ratios[selection + LOWRANK_ONE_TOKEN_SUFFIX] with the
# shape's one-token config, one program per row. Neither wins everywhere (H100, lowrank_h100_t2b_s*.json:
# at 0.7 the one-token config takes Llama-2 down from 1.02x to 0.74x of dense and Llama-3 qkv from 1.10x
# to 0.87x, while the token config is faster on Llama-2 qkv and gate_up), so the launcher runs the faster
# one at the module's sparsity, and the crossover is that one's.
LOWRANK_ONE_TOKEN_SUFFIX = "_lowrank_one_token"


def _lowrank_tables(data: dict, selection: str, key: str) -> tuple[dict | None, dict | None]:
    """The shape's two low-rank ratio tables in `data` (dispatch_table): with the token count's config,
    and with the one-token config (LOWRANK_ONE_TOKEN_SUFFIX); None where one is missing."""
    ratios = data.get("ratios", {})
    return (ratios.get(selection + "_lowrank", {}).get(key),
            ratios.get(selection + LOWRANK_ONE_TOKEN_SUFFIX, {}).get(key))


def _table_crossover(data: dict, n: int, k: int, selection: str, sparsity: float, lowrank: bool) -> int | None:
    """crossover_tokens from `data` (dispatch_table)."""
    key = _shape_key(n, k)
    token_config, one_token = _lowrank_tables(data, selection, key) if lowrank else (None, None)
    if token_config:
        return _interpolated_crossover(token_config, sparsity, one_token)
    ratios = data.get("ratios", {}).get(selection, {}).get(key)
    if ratios:
        return _interpolated_crossover(ratios, sparsity)
    table = data.get("crossover", {}).get(selection, {}).get(key)
    if not table:
        return None
    levels = sorted(float(s) for s in table)
    below = [s for s in levels if s <= sparsity + 1e-9]
    level = below[-1] if below else levels[0]
    return int(table[f"{level:g}"])


# Sparse must win by a margin to be chosen: a ratio within a few percent of 1 is inside
# the benchmark's run-to-run noise and buys nothing (batch sizes must never lose to dense).
DISPATCH_MAX_RATIO = 0.95


def interpolated_ratio(ratios: dict, sparsity: float, tokens: int) -> float | None:
    """ratios {level: {tokens: sparse_ms / dense_ms}} (keys as in dispatch.json) -> the ratio
    at `sparsity`, linear between the measured levels around it (clamped to the outermost);
    None where either level lacks this token count."""
    levels = sorted(float(s) for s in ratios)
    lo = max([s for s in levels if s <= sparsity + 1e-9], default=levels[0])
    hi = min([s for s in levels if s >= sparsity - 1e-9], default=levels[-1])
    r_lo = ratios[f"{lo:g}"].get(str(tokens))
    r_hi = ratios[f"{hi:g}"].get(str(tokens))
    if r_lo is None or r_hi is None:
        return None
    w = 0.0 if hi == lo else (sparsity - lo) / (hi - lo)
    return (1 - w) * r_lo + w * r_hi


def _interpolated_crossover(ratios: dict, sparsity: float, alternative: dict | None = None) -> int:
    """The largest token count up to which sparse wins at `sparsity`. ratios: {level: {tokens:
    sparse_ms / dense_ms}}; alternative: the same for a second way to run the kernels (the low-rank
    term's one-token config), the faster of the two counting at each token count."""
    limit = 0
    for t in sorted({int(t) for per in ratios.values() for t in per}):
        ratio = interpolated_ratio(ratios, sparsity, t)
        other = interpolated_ratio(alternative, sparsity, t) if alternative else None
        if ratio is not None and other is not None:
            ratio = min(ratio, other)
        if ratio is None or ratio > DISPATCH_MAX_RATIO:
            break
        limit = t
    return limit


def lowrank_rows_one_token(n: int, k: int, tokens: int, sparsity: float | None,
                           selection: str = "threshold", gpu: str | None = None) -> bool:
    """Whether a step of `tokens` rows on a layer with the low-rank term runs faster with the shape's
    one-token config than with its committed config for that token count, by the dispatch table's two
    measurements at the module's sparsity (LOWRANK_ONE_TOKEN_SUFFIX). False where either is missing or
    the sparsity is unknown: the token config, as before the table had the second."""
    if tokens <= 1 or sparsity is None:
        return False
    data = dispatch_table(gpu)
    return _LOWRANK_ROWS.get((data,), (n, k, tokens, sparsity, selection),
                             lambda: _one_token_faster(data, n, k, tokens, sparsity, selection))


def _one_token_faster(data: dict, n: int, k: int, tokens: int, sparsity: float, selection: str) -> bool:
    token_config, one_token = _lowrank_tables(data, selection, _shape_key(n, k))
    if not token_config or not one_token:
        return False
    ratio = interpolated_ratio(token_config, sparsity, tokens)
    other = interpolated_ratio(one_token, sparsity, tokens)
    return ratio is not None and other is not None and other < ratio


def _dispatch_tokens(n: int, k: int, selection: str, sparsity: float | None = None,
                     lowrank: bool = False) -> int | None:
    """Token limit the op applies itself: the crossover at the module's sparsity when the caller
    passes it (the LinearMethod does: the same limit it caps max_sparse_tokens with), else at the
    design sparsity of the table (dispatch.json "design_sparsity")."""
    data = dispatch_table()
    if not data:
        return None
    level = float(data.get("design_sparsity", 0.5)) if sparsity is None else sparsity
    return crossover_tokens(n, k, selection, level, lowrank=lowrank)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """The layout the kernels read: logical [N, K], stored [K, N]-contiguous.

    Returns ``w_t.t()`` where w_t is a contiguous [K, N] copy: rows of input channels
    are contiguous, so a skipped channel is a skipped contiguous row. Dense F.linear
    on it is a plain NN GEMM for cuBLAS (measured in docs/kernels.md). Also apply it
    to lowrank_down [r, K]. Allocates the split-K counters of the device, outside any
    CUDA-graph capture.
    """
    if weight.dim() != 2:
        raise ValueError(f"prepare_weight expects a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    _workspace_for(weight.device)
    if _is_prepared(weight):
        return weight
    return weight.t().contiguous().t()


# Rank granularity of the low-rank factors the kernels read. Triton vectorises a row load
# to 16 bytes only when it can prove the row stride divisible by 16 elements; a rank from
# the budget formula (153, 102, 172...) leaves every v_t / u row misaligned, and the
# low-rank term then cost more than the sparsity saved (H100, one token, s = 0.5:
# llama2 qkv 48 us at r = 153 against 30 us zero-padded to 160, dense 37 us;
# benchmarks/results/lowrank_h100.json).
LOWRANK_RANK_MULTIPLE = 16


def prepare_lowrank(lowrank_up: torch.Tensor, lowrank_down: torch.Tensor,
                    multiple: int = LOWRANK_RANK_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """The R-Sparse factors in the layout the kernels read: the rank zero-padded to a
    multiple of ``multiple`` (exact: padded ranks add 0 in f32), lowrank_down [r', K] prepared
    like a weight ([K, r'] storage) and lowrank_up [N, r'] contiguous, which the epilogue
    launch reads densely (it takes any strides). One copy each; the unpadded tensors can be
    freed. (Other multiples: benchmarks only.)"""
    if lowrank_up.dim() != 2 or lowrank_down.dim() != 2 or lowrank_up.shape[1] != lowrank_down.shape[0]:
        raise ValueError(f"lowrank_up [N, r] and lowrank_down [r, K] do not match: shapes "
                         f"{tuple(lowrank_up.shape)} and {tuple(lowrank_down.shape)}")
    r = lowrank_up.shape[1]
    padded = triton_cdiv(r, multiple) * multiple
    if padded != r:
        up = lowrank_up.new_zeros(lowrank_up.shape[0], padded)
        up[:, :r] = lowrank_up
        down = lowrank_down.new_zeros(padded, lowrank_down.shape[1])
        down[:r] = lowrank_down
        lowrank_up, lowrank_down = up, down
    return lowrank_up.contiguous(), prepare_weight(lowrank_down)


def _is_prepared(weight: torch.Tensor) -> bool:
    # [N, K] view of [K, N] storage: unit stride along N
    return weight.stride(0) == 1 or weight.shape[0] == 1


def _as_kn(weight: torch.Tensor, name: str) -> torch.Tensor:
    """[K, N] view with unit column stride; copies (with a one-time warning) if unprepared."""
    global _warned_layout
    if not _is_prepared(weight):
        if not _warned_layout:
            warnings.warn(
                f"rsparse: {name} is not in the prepared [K, N] layout (strides {weight.stride()}); "
                "it is copied on every call. Call vllm_rsparse.launchers.prepare_weight once after loading.",
                stacklevel=3,
            )
            _warned_layout = True
        weight = weight.t().contiguous().t()
    return weight.t()


def _counters_for(device: torch.device) -> torch.Tensor:
    return _workspace_for(device).counters


class Workspace(typing.NamedTuple):
    """Per-device scratch of the kernels. Every split-K buffer is zero between launches
    (the kernels re-zero what they used); the lists are written before they are read."""

    counters: torch.Tensor  # [COUNTER_SLOTS] i32: arrivals per output tile (counter finish)
    accumulator: torch.Tensor  # [MAX_ROWS, WORKSPACE_COLS] f32: partial sums (counter finish)
    fixed: torch.Tensor  # [MAX_ROWS, WORKSPACE_COLS] i64: fixed-point words (fixed-point finish)
    lists: torch.Tensor  # [LIST_ROWS, WORKSPACE_COLS] i32: compact channel lists

    def is_clean(self) -> bool:
        """True when the split-K buffers are all zero (a test's check that nothing leaked)."""
        return not (self.counters.any() or self.accumulator.any() or self.fixed.any())


def _workspace_for(device: torch.device) -> Workspace:
    ws = _workspaces.get(device)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rsparse: the split-K workspace would be allocated during CUDA-graph capture; "
                "call vllm_rsparse.launchers.prepare_weight on the weights before capture"
            )
        ws = Workspace(
            counters=torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device),
            accumulator=torch.zeros((MAX_ROWS, WORKSPACE_COLS), dtype=torch.float32, device=device),
            fixed=torch.zeros((MAX_ROWS, WORKSPACE_COLS), dtype=torch.int64, device=device),
            lists=torch.zeros((LIST_ROWS, WORKSPACE_COLS), dtype=torch.int32, device=device),
        )
        _workspaces[device] = ws
    return ws


# ---------------------------------------------------------------------------
# kernel choice
# ---------------------------------------------------------------------------


def kernel_support(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """(ok, reason): whether the Triton path runs for these tensors; reason lists every
    failed condition."""
    reasons = []
    if not (x.is_cuda or interpreting()):
        reasons.append(f"x is on {x.device}, the kernels need CUDA (or TRITON_INTERPRET=1)")
    if x.device != weight.device:
        reasons.append(f"x on {x.device} but weight on {weight.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"x dtype {x.dtype} not in {SUPPORTED_DTYPES}")
    if weight.dtype != x.dtype:
        reasons.append(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if x.dim() != 2:
        reasons.append(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    elif x.shape[0] > MAX_ROWS:
        reasons.append(f"{x.shape[0]} tokens > {MAX_ROWS} rows per launch")
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed")
    return (not reasons, "; ".join(reasons) if reasons else "ok")


def triton_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Boolean form of kernel_support, what ops._sparse_path asks."""
    return kernel_support(x, weight)[0]


def _check_inputs(x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down) -> None:
    ok, reason = kernel_support(x, weight)
    if not ok:
        raise ValueError(f"rsparse sparse_linear: {reason}")
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, K={k}], got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    if n > WORKSPACE_COLS:
        raise ValueError(f"N = {n} exceeds the split-K workspace of {WORKSPACE_COLS} columns")
    if k > WORKSPACE_COLS:
        raise ValueError(f"K = {k} exceeds the channel-list scratch of {WORKSPACE_COLS} columns")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N={n}], got shape {tuple(bias.shape)}")
    if keep == THRESHOLD_SELECTION:
        if threshold is None or threshold.numel() != 1:
            got = None if threshold is None else tuple(threshold.shape)
            raise ValueError(f"threshold selection needs a 1-element threshold tensor, got {got}")
        if threshold.device != x.device:
            raise ValueError(f"threshold on {threshold.device}, expected {x.device}")
    elif not 0 <= keep <= k:
        raise ValueError(f"keep must be -1 (threshold selection) or in [0, K={k}], got {keep}")
    if channel_scale is not None and tuple(channel_scale.shape) != (k,):
        raise ValueError(f"channel_scale must be [K={k}], got shape {tuple(channel_scale.shape)}")
    if (lowrank_up is None) != (lowrank_down is None):
        raise ValueError("lowrank_up and lowrank_down must be given together")
    if lowrank_up is not None:
        r = lowrank_up.shape[-1]
        if lowrank_up.dim() != 2 or lowrank_up.shape[0] != n:
            raise ValueError(f"lowrank_up must be [N={n}, r], got shape {tuple(lowrank_up.shape)}")
        if tuple(lowrank_down.shape) != (r, k):
            raise ValueError(f"lowrank_down must be [r={r}, K={k}], got shape {tuple(lowrank_down.shape)}")
        if n + r > WORKSPACE_COLS:
            raise ValueError(f"N + r = {n + r} exceeds the split-K workspace of {WORKSPACE_COLS} columns")
        for name, t in (("lowrank_up", lowrank_up), ("lowrank_down", lowrank_down)):
            if t.dtype != x.dtype:
                raise ValueError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def topk_thresholds(
    x: torch.Tensor, keep: int, channel_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (threshold, tie cut) that select exactly `keep` channels.

    # x [M, K]  channel_scale [K]  ->  thr [M] f32  jcut [M] i32
    """
    from vllm_rsparse.kernels.topk_select import topk_threshold_hist_kernel, topk_threshold_kernel

    m, k = x.shape
    thr = torch.empty(m, dtype=torch.float32, device=x.device)
    jcut = torch.empty(m, dtype=torch.int32, device=x.device)
    scale = channel_scale if channel_scale is not None else x
    if TOPK_HISTOGRAM_ENABLED and k <= _HIST_MAX_K:
        # the whole row in one block: one histogram pass over registers per digit
        topk_threshold_hist_kernel[(m,)](
            x, scale, thr, jcut, k, keep, x.stride(0), x.stride(1),
            HAS_SCALE=channel_scale is not None, **hist_select_constexprs(k, x.dtype, channel_scale is not None),
            num_warps=hist_warps(triton_next_power_of_2(k)),
        )
        return thr, jcut
    low_bit, top_bit = score_bit_span(x.dtype, channel_scale is not None)
    block_k = min(_SELECT_BLOCK_K, triton_next_power_of_2(k))
    topk_threshold_kernel[(m,)](
        x, scale, thr, jcut,
        k, keep, x.stride(0), x.stride(1),
        HAS_SCALE=channel_scale is not None, BLOCK_K=block_k, LOW_BIT=low_bit, TOP_BIT=top_bit,
        num_warps=_SELECT_WARPS,
    )
    return thr, jcut


# The select passes cover only the bits a score can have set (score_bit_span). False: all 32, as
# before session 28 -- the A/B switch of benchmarks/gpu/topk_select_time.py.
TOPK_SCORE_SPAN_ENABLED = True
# Low mantissa bits that are zero in every value of a 16-bit float widened to f32: bf16 keeps 7 of
# f32's 23 mantissa bits, fp16 10 (its subnormals fewer, still in the high bits once normalised).
_ZERO_LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}


# Exact top-k selected inside the one-row compact GEMV launch instead of by its own launch before it
# (session 28; built and tested, not measured: off). Every program of the GEMV then finds its row's
# (threshold, tie cut) from the whole row -- the same arithmetic as the select kernel, so the same
# channels -- which saves the select's launch (one kernel's 2.25 us floor in a CUDA graph, plus the
# select's own ~8 us at K = 4096 in session 27) at the cost of that select in every program's
# prologue. Rows up to TOPK_IN_KERNEL_MAX_K channels: the row's scores stay in the program's registers
# during the select (32 a thread at 4 warps). None: RSPARSE_TOPK_IN_KERNEL (1 on, 0 / unset off).
TOPK_IN_KERNEL_ENV = "RSPARSE_TOPK_IN_KERNEL"
TOPK_IN_KERNEL: bool | None = None
TOPK_IN_KERNEL_MAX_K = 4096


def topk_in_kernel(cfg: GemvConfig, k: int) -> bool:
    """Whether a launch with this config selects exact top-k in its own programs (TOPK_IN_KERNEL, or
    RSPARSE_TOPK_IN_KERNEL when it is None): the one-row compact kernel, rows of at most
    TOPK_IN_KERNEL_MAX_K channels."""
    enabled = TOPK_IN_KERNEL
    if enabled is None:
        from vllm_rsparse.config import env_switch

        enabled = env_switch(TOPK_IN_KERNEL_ENV)
    return enabled and k <= TOPK_IN_KERNEL_MAX_K and uses_compact_kernel(cfg)


def hist_select_constexprs(k: int, dtype: torch.dtype, has_scale: bool) -> dict:
    """The one-block histogram select's shape for rows of k channels (BLOCK_K, DIGIT_BITS, LOW_BIT,
    TOP_BIT of topk_select.topk_row_threshold): the select kernel and the GEMV's in-kernel select
    (topk_in_kernel) take the same, so they select the same channels."""
    block_k = triton_next_power_of_2(k)
    low_bit, top_bit = score_bit_span(dtype, has_scale)
    return dict(BLOCK_K=block_k, DIGIT_BITS=hist_digit_bits(block_k), LOW_BIT=low_bit, TOP_BIT=top_bit)


def score_bit_span(dtype: torch.dtype, has_scale: bool) -> tuple[int, int]:
    """(LOW_BIT, TOP_BIT): the top-k select's scores can have bits [LOW_BIT, TOP_BIT) of their f32
    pattern set. A score without a channel scale is |x| widened from x's dtype: sign bit clear, low
    bits zero (a bf16 row: bits 16-30, 15 bits of passes instead of 32). A channel scale's product
    can set any bit."""
    if has_scale or not TOPK_SCORE_SPAN_ENABLED:
        return 0, 32
    return _ZERO_LOW_BITS.get(dtype, 0), 31


# The histogram select (one block per row): on the H100 (576f7cf) it gives the radix select's
# (threshold, tie cut) exactly (tests/test_kernels.py exact-count tests, 16 x 14336 rows with
# heavy ties) and takes 16 / 55 / 55 us against 25 / 67 / 78 us at K = 4096 / 11008 / 14336
# (benchmarks/results/topk_select_h100.json). With the digit sizes and the bf16 span below, 5 / 17.5 us
# on the H100 (topk_select_warps_h100.md, session 30): exact top-k beats dense on the K = 4096 shapes at one
# token and not on down (kernels_committed_larosa_h100.md; the H100's by_gpu entries of dispatch.json).
TOPK_HISTOGRAM_ENABLED = True
# Bits per histogram pass. The timings above had 4 passes of 8 bits over 512 bins (the channels
# outside the prefix in a bin of their own; session 27 counts them in bin 0). On the H200
# (topk_select_h200.md, one run, the radix select beside it) the fastest digits were 5 bits at
# K = 4096 (8.2 us, 0.33 of the radix select; 8 bits: 10.6 us) and 4 bits at K = 11008 / 14336
# (36.2 / 36.4 us, 0.53 / 0.46; 8 bits: 38.6 / 38.3, 6 bits: 63 us). The GPU's Triton (3.6) builds
# each histogram from warp ballots, cheaper at fewer bins (topk_select.py).
HIST_DIGIT_BITS: int | None = None  # None: hist_digit_bits' choice by row width; an int forces it
HIST_DIGIT_BITS_CHOICES = (4, 5, 6, 8)
_HIST_MAX_K = 16384
# Warps of the histogram select's one block. At 8 warps and 16384 channels a row, Triton 3.6 builds the
# 4-bit select in 255 registers with a 2.3 KB stack; at 32 warps (16 values a thread) in 64 registers
# without one, for the same instructions in all (session 27, offline build). None: hist_warps' choice by
# row width; an int forces it.
HIST_WARPS: int | None = None
HIST_WARPS_CHOICES = (8, 16, 32)


def hist_warps(block_k: int) -> int:
    """The histogram select's warps for rows of block_k (a power of two) channels: 16 above 4096 (the
    down projections), 8 up to it. Measured on the H100 (session 31) through the launcher, one token,
    s = 0.5, the GEMV after it (kernels_committed_larosa_hist5w16_h100.md against kernels_committed_h100.md):
    5-bit digits at 16 warps take Llama-2 down from 1.09x to 0.96x of dense and Llama-3 down from 1.42x to
    0.89x, where the select alone is 3.8 / 4.0 us faster (topk_select_warps_s31_h100.md); at K = 4096 8 and
    16 warps are within 0.1 us (5.0 / 4.9-5.1 us) and the GEMV ratios within 0.01."""
    if HIST_WARPS is not None:
        return HIST_WARPS
    return 16 if block_k > 4096 else 8


def hist_digit_bits(block_k: int) -> int:
    """The histogram select's digit size for rows of block_k (a power of two) channels: 5 bits (3 passes
    over a bf16 row's 15 score bits, score_bit_span). The fastest at every width and block size on the H100
    over the span (topk_select_warps_h100.md, session 30; repeated in session 31); before session 31 the
    rows above 4096 took 4 bits, the fastest in session 27's passes over all 32 bits (H200)."""
    if HIST_DIGIT_BITS is not None:
        return HIST_DIGIT_BITS
    return 5


# One program per row walks the row 9 times; a large block keeps the loop short.
_SELECT_BLOCK_K = 2048
_SELECT_WARPS = 8


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def compact_chunk(k: int, split_k: int) -> int:
    """K channels per compact program for a requested split_k (a power of two, so the
    program's x chunk is one tl.arange); the launch uses cdiv(k, chunk) programs along K."""
    return min(MAX_CHUNK, max(MIN_CHUNK, triton_next_power_of_2(triton_cdiv(k, max(1, split_k)))))


def uses_compact_kernel(cfg: GemvConfig) -> bool:
    """Whether a launch with this config runs sparse_gemv_compact_kernel (one-row programs)."""
    return cfg.rows == 1 and (COMPACT_ROWS_ENABLED or cfg.kernel == "compact")


# K chunk of a union compact program: its x tile is [rows, chunk] f32 in registers (64 a
# thread at 4 warps for 16 x 512); fewer rows (UNION_FMA_ROWS) take longer chunks for the same
# registers (union_max_chunk)
UNION_MAX_CHUNK = 512


def union_max_chunk(rows: int) -> int:
    """The longest K chunk of a union compact program of `rows` rows: UNION_MAX_CHUNK's
    register budget at 16 rows, at most MAX_CHUNK."""
    return min(MAX_CHUNK, UNION_MAX_CHUNK * MAX_ROWS // rows)


# The union compact loop with its list entries loaded one step ahead (the kernel's LIST_AHEAD).
# Built in session 16 after the GPU sweep, not yet measured: off (the committed union configs
# were ranked without it). benchmarks/gpu/union_rows.py --list-ahead times both.
UNION_LIST_AHEAD = False


# (The FMA union loop (2 / 4 rows) with each row's selected x staged next to the union list, so that a
# list step loaded it as one contiguous vector instead of gathering it by channel index: measured in
# session 21 (union_rows_fma_staged_h200.md) at 0.94-1.73x the gathered loop's time -- the cause was
# the registers of the row accumulators (fma_step_sum) -- and removed in session 25 with its 4 MiB
# workspace; the code is at b21387c.)


def fma_ahead_steps(cfg: GemvConfig) -> int:
    """The FMA union loop's (2 / 4 rows) pipeline depth: list steps whose gathers are in flight
    while a step's FMAs run. The loop is pipelined by hand, not by Triton, so for these configs
    num_stages is this depth (1 or 2; session 21) and Triton's own is 1; other configs: 1. Two steps
    ran slower on the H200 (union_rows_fma_ahead_h200.md, ncu_fma_h200.md): the sweep ranks one."""
    if cfg.rows not in UNION_FMA_ROWS:
        return 1
    return cfg.num_stages


def triton_num_stages(cfg: GemvConfig) -> int:
    """Triton's own pipelining depth for a launch with this config: 1 for the FMA union loop, whose
    num_stages is its hand pipeline's depth (fma_ahead_steps); num_stages for every other loop."""
    return 1 if cfg.rows in UNION_FMA_ROWS else cfg.num_stages


def compact_stages(cfg: GemvConfig) -> int:
    """The one-row compact loop's pipeline: 1 = by hand (the next list step's gathers issued before a
    step's FMAs, in registers; every committed config until session 27); n >= 2 = Triton's pipeliner,
    n - 1 list steps copied ahead into shared memory with cp.async. Only a config of kernel "compact"
    asks for it: a walk config run on the compact kernel (COMPACT_ROWS_ENABLED, the CPU tests) keeps
    the hand pipeline, whatever its num_stages (the walk's own pipeliner depth)."""
    return cfg.num_stages if cfg.kernel == "compact" else 1


# Triton lays a [BLOCK_K, BLOCK_N] tile of 16-bit weights out as 16-byte vectors along N, 32 threads
# of a warp side by side, and the warps along N while they fit: from this many columns per warp on,
# every warp lies along N and each thread holds whole columns of the tile.
_COLUMNS_PER_WARP = 8 * 32


def fma_step_sum(cfg: GemvConfig) -> bool:
    """Whether the FMA union loop sums each step over K at once (the kernel's STEP_SUM): where every
    warp of the weight tile lies along N, so the sum stays in each thread's registers (elsewhere it
    would cross warps through shared memory at every step)."""
    return cfg.rows in UNION_FMA_ROWS and cfg.block_n >= _COLUMNS_PER_WARP * cfg.num_warps


def uses_union_compact_kernel(cfg: GemvConfig) -> bool:
    """Whether a launch with this config (and no low-rank term) runs sparse_gemv_union_compact_kernel."""
    return cfg.rows > 1 and cfg.kernel == "compact"


def union_lowrank_config(n: int, k: int, rank: int, device: torch.device, sparsity: float | None) -> GemvConfig:
    """The config a launch whose picked config is a union compact one runs when the layer has a
    low-rank term (that kernel has no v_t programs): the shape's one-token config, one program per row."""
    return pick_config(n, k, 1, rank, device, sparsity)


def lowrank_launch_config(cfg: GemvConfig, n: int, k: int, rank: int, device: torch.device,
                          sparsity: float | None, tokens: int | None = None,
                          selection: str = "threshold") -> GemvConfig:
    """The config sparse_gemv runs for `cfg` on a layer with a low-rank term: `cfg` itself unless it is a
    union compact one, whose kernel has no v_t programs (then union_lowrank_config). tokens: the step's
    rows where `cfg` is the launcher's own pick (not a caller's): then also the one-token config where
    the dispatch table measured it faster at this sparsity (lowrank_rows_one_token)."""
    # (CUDA only: elsewhere pick_config reads no table, so the table's choice would name no config it measured)
    if uses_union_compact_kernel(cfg) or (
            tokens is not None and device.type == "cuda"
            and lowrank_rows_one_token(n, k, tokens, sparsity, selection)):
        return union_lowrank_config(n, k, rank, device, sparsity)
    return cfg


def union_walk_lowrank_config(cfg: GemvConfig) -> GemvConfig:
    """What a union compact config with a low-rank term ran before session 33: the 16-row union walk of
    the same tile (its tl.dot needs 16 rows and K steps of >= 16). Kept for lowrank_time.py --tokens,
    which times it against union_lowrank_config."""
    return dataclasses.replace(cfg, kernel="walk", rows=MAX_ROWS, block_k=max(16, cfg.block_k))


def k_split(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K channels per program, programs along K) of a launch with this config: compact
    programs take power-of-two chunks, the walk whole BLOCK_K steps, so the programs along K
    can differ from cfg.split_k."""
    if uses_compact_kernel(cfg):
        # compact programs: K chunks of a power-of-two size (one x vector per program)
        k_per_split = compact_chunk(k, cfg.split_k)
    elif uses_union_compact_kernel(cfg):
        k_per_split = min(union_max_chunk(cfg.rows), compact_chunk(k, cfg.split_k))
    else:
        k_per_split = triton_cdiv(triton_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_per_split, triton_cdiv(k, k_per_split)


# The compact kernel's v_t programs (R-Sparse's lowrank_down: rows of R = 64-256 columns, the
# dropped channels' list) come in three layouts (GemvConfig.lowrank per shape):
#   w_tiles      the w_t tile shape (BLOCK_N x BLOCK_K) and K chunk: split_k more programs,
#                each with a w_t program's list steps on a few percent of its bytes (the only
#                layout before session 11)
#   own_tiles    all of R in one tile up to LOWRANK_MAX_BLOCK_R columns and as many rows per
#                list step as keep a w_t step's register tile (up to LOWRANK_MAX_BLOCK_KV), on
#                the w_t chunk: fewer, wider list steps
#   wide_chunks  own tiles on K chunks that many times longer (the default): about a w_t
#                program's list steps each, and a few programs along K instead of split_k --
#                which keeps a grid that fills the GPU once from spilling into a second wave
#                (o_proj, both qkv shapes, Llama-2 down; lowrank_h200_s*.json, session 11)
# LOWRANK_LAYOUT forces one layout for every launch (benchmarks, tests); None: the config's.
LOWRANK_DEFAULT_LAYOUT = "wide_chunks"
LOWRANK_LAYOUT: str | None = None
LOWRANK_MAX_BLOCK_R = 256
LOWRANK_MAX_BLOCK_KV = 64


@dataclasses.dataclass(frozen=True)
class LowrankTile:
    """Shape of the compact kernel's v_t programs: BLOCK_R columns, BLOCK_KV rows per list step,
    K chunks of `chunk` channels (so cdiv(K, chunk) programs along K add into z)."""

    block_r: int
    block_kv: int
    chunk: int


def lowrank_layout(cfg: GemvConfig) -> str:
    """The v_t program layout a compact launch with this config runs (LOWRANK_LAYOUTS)."""
    return LOWRANK_LAYOUT or cfg.lowrank or LOWRANK_DEFAULT_LAYOUT


# False: the v_t chunks of the design sparsity at every sparsity (the layout before session 17;
# benchmarks/gpu/committed_kernels.py --ab-lowrank-chunks times both in one process).
LOWRANK_CHUNKS_FOLLOW_SPARSITY = True


def dropped_per_kept(sparsity: float | None) -> int:
    """How many times longer a v_t program's dropped-channel list is than a w_t program's kept list
    on the same K range, at the module's sparsity, as a power of two (1 at or below the design
    sparsity 0.5, where the wide_chunks layout was measured; None: the design sparsity)."""
    if sparsity is None or sparsity <= 0.5 or not LOWRANK_CHUNKS_FOLLOW_SPARSITY:
        return 1
    ratio = sparsity / max(1.0 - sparsity, 1e-3)
    return 1 << round(math.log2(ratio))


def lowrank_tile(cfg: GemvConfig, rank: int, chunk: int, sparsity: float | None = None) -> LowrankTile:
    """The v_t program shape of a launch whose w_t programs take K chunks of `chunk`; only the
    compact kernel has v_t programs of their own shape (the walk kernel's are w_t tiles).
    sparsity: the module's; above 0.5 the wide_chunks layout shortens its chunks by the dropped
    lists' extra length, so a v_t program still takes about a w_t program's list steps. Without
    it, at s = 0.9 two v_t programs each walked ~29 dependent list steps while the w_t programs
    took ~3, and R-Sparse's qkv ran at 0.9-1.2x dense against 0.6-0.7x at s = 0.7
    (benchmarks/results/kernels_committed_h200.md, session 17)."""
    layout = lowrank_layout(cfg)
    if layout not in LOWRANK_LAYOUTS:
        raise ValueError(f"launchers.LOWRANK_LAYOUT must be one of {LOWRANK_LAYOUTS} or None, got {layout!r}")
    if layout == "w_tiles" or rank == 0 or not uses_compact_kernel(cfg):
        return LowrankTile(cfg.block_n, cfg.block_k, chunk)
    block_r = min(LOWRANK_MAX_BLOCK_R, max(16, triton_next_power_of_2(rank)))
    block_kv = max(cfg.block_k, min(LOWRANK_MAX_BLOCK_KV, cfg.block_k * cfg.block_n // block_r))
    if layout == "own_tiles":
        return LowrankTile(block_r, max(cfg.block_k, min(block_kv, chunk)), chunk)
    # powers of two throughout, so the chunk stays one tl.arange
    wide = chunk * block_kv // cfg.block_k // dropped_per_kept(sparsity)
    return LowrankTile(block_r, block_kv, min(MAX_CHUNK, max(chunk, wide)))


def fixed_point_finish(split_k: int) -> bool:
    """Whether split_k programs along K finish with the fixed-point word (FIXED_POINT_SPLIT_ENABLED,
    at most FX_MAX_SPLIT arrivals) rather than the counter; one program needs no finish."""
    return split_k > 1 and FIXED_POINT_SPLIT_ENABLED and split_k <= FX_MAX_SPLIT


def sparse_gemv(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thr: torch.Tensor,
    jcut: torch.Tensor | None,
    bias: torch.Tensor | None,
    channel_scale: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    v_t: torch.Tensor | None,
    config: GemvConfig | None = None,
    sparsity: float | None = None,
    keep: int | None = None,
) -> torch.Tensor:
    """Masked GEMV (+ R-Sparse low-rank term), no validation (sparse_linear validates).
    sparsity: the module's input sparsity, for the config band (pick_config).
    keep: exact top-k of each row instead of thr / jcut (pass None for both): selected in the GEMV's
    own programs where topk_in_kernel says so, else by topk_thresholds first.

    # x [M, K]  w_t [K, N] (unit stride along N)  thr [1] or [M] f32  jcut [M] i32 or None
    # bias [N]  channel_scale [K]  lowrank_up [N, r] (any strides; prepare_lowrank: contiguous)
    # v_t [K, r] (unit stride along r)  -> out [M, N] in x.dtype
    """
    from vllm_rsparse.kernels.sparse_gemv import (sparse_gemv_compact_kernel, sparse_gemv_kernel,
                                                  sparse_gemv_union_compact_kernel)

    m, k = x.shape
    n = w_t.shape[1]
    rank = 0 if v_t is None else v_t.shape[1]
    has_lowrank = rank > 0
    cfg = config or pick_config(n, k, m, rank, x.device, sparsity)
    if has_lowrank:
        # a union compact config has no v_t programs: one-row programs with the shape's one-token
        # config instead, each row reading its own channels. (Until session 33 this was the 16-row
        # union walk of the same tile, whose predicated rows read about the whole matrix: 1.0-24x of
        # dense on the H100, lowrank_h100_s33.md; lowrank_time.py --tokens times both.)
        # Where the launcher picked the config itself, the dispatch table may send the step to the
        # one-token config instead (lowrank_rows_one_token); a caller's config is run as given.
        cfg = lowrank_launch_config(cfg, n, k, rank, x.device, sparsity, tokens=None if config else m,
                                    selection="topk" if keep is not None else "threshold")
    select_in_kernel = keep is not None and topk_in_kernel(cfg, k)
    if keep is not None and not select_in_kernel:
        thr, jcut = topk_thresholds(x, keep, channel_scale)
    rows = cfg.rows
    row_groups = triton_cdiv(m, rows)
    tiles_w = triton_cdiv(n, cfg.block_n)
    compact = uses_compact_kernel(cfg)
    k_per_split, split_k = k_split(k, cfg)
    v_tile = lowrank_tile(cfg, rank, k_per_split, sparsity)
    tiles = tiles_w + (triton_cdiv(rank, v_tile.block_r) if has_lowrank else 0)
    split_v = triton_cdiv(k, v_tile.chunk)
    if tiles * row_groups > COUNTER_SLOTS:
        raise ValueError(f"{tiles * row_groups} output tiles exceed the {COUNTER_SLOTS} split-K counters")

    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dummy = out  # placeholder pointer for absent optional tensors (never dereferenced)
    ws = _workspace_for(x.device)
    fixed = fixed_point_finish(split_k)
    pdl = use_pdl(x.device)
    launch_pdl = {"launch_pdl": True} if pdl else {}  # the keyword only where it is used
    evict = "evict_first" if WEIGHT_EVICT_FIRST or cfg.evict else ""
    up_pdl = has_lowrank and compact and lowrank_up_pdl(x.device)
    if has_lowrank:
        y32 = torch.empty((m, n), dtype=torch.float32, device=x.device)
        z = torch.empty((m, rank), dtype=torch.float32, device=x.device)
    else:
        y32 = z = dummy
    common = (m, n, k, rank)
    scale_arg = channel_scale if channel_scale is not None else dummy
    per_row = jcut is not None or select_in_kernel  # a threshold and a tie cut per row: exact top-k
    if select_in_kernel:
        thr = jcut = dummy  # the programs find them (TOPK_BLOCK); never read
    jcut_arg = jcut if jcut is not None else thr
    bias_arg = bias if bias is not None else dummy
    if uses_union_compact_kernel(cfg):
        # one program per (output tile, K chunk, group of `rows` rows): a weight row is read
        # once if any row of the group selected its channel, through a list of those channels
        sparse_gemv_union_compact_kernel[(tiles, split_k, row_groups)](
            x, w_t, scale_arg, thr, jcut_arg, bias_arg, ws.lists,
            ws.accumulator, ws.counters, ws.fixed, out,
            m, n, k, WORKSPACE_COLS, WORKSPACE_COLS,
            x.stride(0), x.stride(1), w_t.stride(0), out.stride(0), out.stride(1),
            ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=k_per_split,
            HAS_SCALE=channel_scale is not None, PER_ROW=per_row, HAS_BIAS=bias is not None,
            SPLIT=split_k > 1, FIXED=fixed, DOT_F32=interpreting(), GDC=pdl, EVICT=evict,
            LIST_AHEAD=UNION_LIST_AHEAD,
            AHEAD_STEPS=fma_ahead_steps(cfg), STEP_SUM=fma_step_sum(cfg), num_warps=cfg.num_warps,
            num_stages=triton_num_stages(cfg), **launch_pdl,
        )
    elif compact:
        # one program per (output tile, K chunk, token row); each row reads only its own
        # channels, through a compact list of them
        stages = compact_stages(cfg)
        # the in-kernel select's constexprs (TOPK_BLOCK 0: none); fixed values without it, so that the
        # threshold path compiles once whatever the dtype and scale
        select = (hist_select_constexprs(k, x.dtype, channel_scale is not None) if select_in_kernel else
                  dict(BLOCK_K=0, DIGIT_BITS=5, LOW_BIT=0, TOP_BIT=32))
        sparse_gemv_compact_kernel[(tiles, split_k, m)](
            x, w_t, v_t if has_lowrank else w_t, scale_arg, thr, jcut_arg, bias_arg, ws.lists,
            ws.accumulator, ws.counters, ws.fixed, out, y32, z,
            *common, tiles_w, WORKSPACE_COLS, WORKSPACE_COLS, split_v,
            x.stride(0), x.stride(1), w_t.stride(0), v_t.stride(0) if has_lowrank else 0,
            out.stride(0), out.stride(1), keep if select_in_kernel else 0,
            TOPK_BLOCK=select["BLOCK_K"], TOPK_DIGIT_BITS=select["DIGIT_BITS"], TOPK_LOW_BIT=select["LOW_BIT"],
            TOPK_TOP_BIT=select["TOP_BIT"],
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=k_per_split,
            BLOCK_R=v_tile.block_r, BLOCK_KV=v_tile.block_kv, CHUNK_V=v_tile.chunk, SPLIT_V=split_v > 1,
            HAS_SCALE=channel_scale is not None, PER_ROW=per_row, HAS_BIAS=bias is not None,
            HAS_LOWRANK=has_lowrank, SPLIT=split_k > 1, FIXED=fixed, AHEAD=LOAD_AHEAD_ENABLED,
            GDC_WAIT=pdl, GDC_TRIGGER=pdl or up_pdl, EVICT=evict, STAGES=stages,
            num_warps=cfg.num_warps, num_stages=stages, **launch_pdl,
        )
    else:
        sparse_gemv_kernel[(tiles, split_k, row_groups)](
            x, w_t, v_t if has_lowrank else w_t, scale_arg, thr, jcut_arg, bias_arg,
            ws.accumulator, ws.counters, ws.fixed, out, y32, z,
            *common, k_per_split, tiles_w, WORKSPACE_COLS,
            x.stride(0), x.stride(1), w_t.stride(0), v_t.stride(0) if has_lowrank else 0,
            out.stride(0), out.stride(1),
            ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            HAS_SCALE=channel_scale is not None, PER_ROW=per_row, HAS_BIAS=bias is not None,
            HAS_LOWRANK=has_lowrank, SPLIT=split_k > 1, FIXED=fixed, DOT_F32=interpreting(),
            AHEAD=LOAD_AHEAD_ENABLED, GDC=pdl, EVICT=evict,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_pdl,
        )
    if has_lowrank:
        launch_lowrank_up(y32, z, lowrank_up, out, pdl or up_pdl)
    return out


def launch_lowrank_up(y32: torch.Tensor, z: torch.Tensor, lowrank_up: torch.Tensor, out: torch.Tensor,
                      pdl: bool = False) -> None:
    """out [M, N] = y32 [M, N] f32 + z [M, r] f32 @ lowrank_up [N, r]^T, cast once (the R-Sparse
    epilogue launch after sparse_gemv's kernel)."""
    from vllm_rsparse.kernels.sparse_gemv import lowrank_up_kernel

    m, n = out.shape
    rank = lowrank_up.shape[1]
    up_rows = 1 if m == 1 else MAX_ROWS
    launch_pdl = {"launch_pdl": True} if pdl else {}
    lowrank_up_kernel[(triton_cdiv(n, _UP_BLOCK_N), triton_cdiv(m, up_rows))](
        y32, z, lowrank_up, out,
        m, n, rank, lowrank_up.stride(0), lowrank_up.stride(1), out.stride(0), out.stride(1),
        ROWS=up_rows, BLOCK_N=_UP_BLOCK_N, BLOCK_R=_UP_BLOCK_R, DOT_F32=interpreting(), GDC=pdl,
        num_warps=4, **launch_pdl,
    )


# lowrank_up epilogue: reads u [N, r] densely; 64 outputs x 32 ranks per step keeps
# >= 64-byte contiguous segments of u and enough programs for N >= 4096.
_UP_BLOCK_N = 64
_UP_BLOCK_R = 32


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep: int,
    channel_scale: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    config: GemvConfig | None = None,
    use_crossover: bool = True,
    sparsity: float | None = None,
) -> torch.Tensor:
    """The Triton path of torch.ops.rsparse.sparse_linear (see vllm_rsparse/reference.py).

    # x [M, K]  weight [N, K] (prepared: [K, N] storage)  bias [N]  threshold [1] f32
    # keep: -1 = threshold selection, else exact top-k  channel_scale [K]
    # lowrank_up [N, r]  lowrank_down [r, K] (prepared)  ->  y [M, N] in x.dtype
    Above the committed sparse/dense crossover for this shape at the module's sparsity (exact
    top-k: its own; neither: the table's design sparsity) the result is dense F.linear
    (use_crossover=False: always the kernels, as the benchmark and tests need).
    sparsity: the module's calibrated input sparsity, which picks the kernel config band
    (pick_config); exact top-k knows its own (1 - keep / K).
    """
    _check_inputs(x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down)
    m, k = x.shape
    n = weight.shape[0]
    selection = "threshold" if keep == THRESHOLD_SELECTION else "topk"
    if lowrank_up is not None and lowrank_up.shape[-1] == 0:
        lowrank_up = lowrank_down = None
    if keep != THRESHOLD_SELECTION:
        sparsity = 1.0 - keep / k
    limit = _dispatch_tokens(n, k, selection, sparsity, lowrank_up is not None) if x.is_cuda and use_crossover else None
    if limit is not None and m > limit:
        return torch.nn.functional.linear(x, weight, bias)
    w_t = _as_kn(weight, "weight")
    v_t = _as_kn(lowrank_down, "lowrank_down") if lowrank_down is not None else None
    if keep == THRESHOLD_SELECTION:
        thr = threshold.reshape(1)
        if thr.dtype != torch.float32:
            thr = thr.float()
        return sparse_gemv(x, w_t, thr, None, bias, channel_scale, lowrank_up, v_t, config, sparsity)
    # exact top-k: sparse_gemv selects it, in its own launch or before it (topk_in_kernel)
    return sparse_gemv(x, w_t, None, None, bias, channel_scale, lowrank_up, v_t, config, sparsity, keep=keep)


def describe_config(n: int, k: int, tokens: int, rank: int = 0, device: str = "cuda",
                    sparsity: float | None = None) -> dict:
    """The config a call would use, for logs and benchmarks."""
    return dataclasses.asdict(pick_config(n, k, tokens, rank, torch.device(device), sparsity))


__all__ = [
    "LOWRANK_RANK_MULTIPLE",
    "GemvConfig",
    "config_table",
    "crossover_tokens",
    "describe_config",
    "high_sparsity_from",
    "kernel_support",
    "pick_config",
    "prepare_lowrank",
    "prepare_weight",
    "score_bit_span",
    "sparse_gemv",
    "sparse_linear",
    "topk_in_kernel",
    "topk_thresholds",
    "triton_supported",
]
