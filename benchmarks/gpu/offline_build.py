"""Build the one-token compact kernel (sparse_gemv_compact_kernel) at its committed tiles, or the union
compact kernel (--union), for sm_90 WITHOUT a GPU and report what the machine code looks like:
registers, stack and local memory per thread (the bundled cuobjdump) and calls left in the PTX.

Why: the interpreter never compiles a kernel, so a change that breaks the GPU build, or brings
function calls and a stack into the weight stream (session 13's offline build of the one-launch
R-Sparse kernel, since removed, had calls and a 2.5 KB stack), would pass every CPU test. CI builds
them here (tests/test_kernels.py) so that it fails on a CPU machine, with the venv's Triton (3.9 in CI)
and with the GPU machine's (3.6, which `make install` puts in .venv/triton-gpu: PYTHONPATH=.venv/triton-gpu
selects it). Registers differ between the two; the 3.6 builds' are the GPU's (docs/kernels.md, session 26).

    python benchmarks/gpu/offline_build.py          # one line per build
    python benchmarks/gpu/offline_build.py --json   # the same as JSON
    python benchmarks/gpu/offline_build.py --union  # the union compact kernel (sessions 16, 20) instead
    python benchmarks/gpu/offline_build.py --others # the walk, PDL, low-rank epilogue and top-k builds instead
Run it without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).

Each build also reports a digest of its SASS without addresses and line info ("sass_sha1"): two
checkouts whose builds have the same digests run the same machine code, which is how a kernel refactor
is shown to change nothing on the GPU without one (session 26), best with the GPU machine's Triton:

    PYTHONPATH=.venv/triton-gpu python benchmarks/gpu/offline_build.py --json > before.json   # one commit,
    PYTHONPATH=.venv/triton-gpu python benchmarks/gpu/offline_build.py --json > after.json    # then the other
    python benchmarks/gpu/offline_build.py --compare before.json after.json   # table; exit 1 if any differ
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile

# the compact kernel's pointer arguments and their element types (launchers.sparse_gemv, bf16
# activations and weights); every other non-constexpr argument is an i32
COMPACT_POINTERS = {"p_x": "*bf16", "p_w": "*bf16", "p_v": "*bf16", "p_scale": "*bf16", "p_thr": "*fp32",
                    "p_jcut": "*fp32", "p_bias": "*bf16", "p_list": "*i32", "p_acc": "*fp32", "p_count": "*i32",
                    "p_fx": "*i64", "p_out": "*bf16", "p_y32": "*fp32", "p_z": "*fp32"}

# the committed one-token tiles (kernels/configs/sparse_gemv.json, tokens 1: block_n, block_k, warps,
# K chunk, split-K finish): Llama-2 qkv, o_proj, down; Llama-3 qkv, gate_up, down (Llama-2 gate_up is
# qkv's tile on 512-channel chunks); then Llama-2 qkv's tile with R-Sparse's v_t programs (HAS_LOWRANK)
BUILDS = [dict(num_warps=w, BLOCK_N=bn, BLOCK_K=bk, CHUNK=chunk, FIXED=fixed)
          for bn, bk, w, chunk, fixed in [(512, 16, 4, 256, True), (2048, 4, 8, 32, False),
                                          (1024, 8, 4, 128, False), (1024, 8, 4, 64, True),
                                          (2048, 4, 4, 64, True), (512, 16, 2, 256, True)]]
BUILDS += [dict(num_warps=4, BLOCK_N=512, BLOCK_K=16, CHUNK=256, FIXED=True, HAS_LOWRANK=True, HAS_SCALE=True)]


def compact_constexprs(num_warps: int, **over) -> dict:
    """The compact kernel's constexpr arguments as the launcher passes them on a GPU (one token, the
    weights' evict-first hint of the committed configs); the v_t programs' shape is the one
    launchers.lowrank_tile gives the tile at rank 256 (K = 4096: several v_t programs along K)."""
    from vllm_rsparse import launchers

    values = dict(BLOCK_N=512, BLOCK_K=16, CHUNK=256, HAS_SCALE=False, PER_ROW=False, HAS_BIAS=False,
                  HAS_LOWRANK=False, SPLIT=True, FIXED=True, AHEAD=True, GDC_WAIT=False, GDC_TRIGGER=False,
                  EVICT="evict_first", STAGES=1, TOPK_BLOCK=0, TOPK_DIGIT_BITS=5, TOPK_LOW_BIT=0, TOPK_TOP_BIT=32)
    values.update(over)
    cfg = launchers.GemvConfig(rows=1, block_n=values["BLOCK_N"], block_k=values["BLOCK_K"], split_k=1,
                               num_warps=num_warps, num_stages=1, kernel="compact")
    tile = launchers.lowrank_tile(cfg, 256, values["CHUNK"])
    values.update(BLOCK_R=tile.block_r, BLOCK_KV=tile.block_kv, CHUNK_V=tile.chunk, SPLIT_V=tile.chunk < 4096)
    return values


# the union compact kernel (session 16): the tiles its committed configs use (block_n, block_k, warps,
# stages), each with the list entries in the step and one step ahead (launchers.UNION_LIST_AHEAD)
UNION_POINTERS = {**COMPACT_POINTERS, "p_scale": "*fp32", "p_jcut": "*i32"}
UNION_BUILDS = [dict(num_warps=w, num_stages=st, BLOCK_N=bn, BLOCK_K=bk, LIST_AHEAD=ahead)
                for bn, bk, w, st in [(128, 32, 4, 1), (128, 32, 4, 3), (256, 16, 4, 2), (256, 64, 8, 2)]
                for ahead in (False, True)]
# its FMA loop (2 / 4 rows, session 20; gathers one or two list steps ahead,
# session 21) at the first tile of each row count in benchmarks/gpu/union_rows.py's FMA_TILES, then the
# 16 KB tiles that sum each step over K in registers (launchers.fma_step_sum, session 21): no stack on
# Triton 3.9 (127-168 registers; 8 rows of 128 x 8 at 4 warps had a 40-byte stack, so that tile is not
# among them)
UNION_FMA_BUILDS = [dict(num_warps=w, num_stages=1, ROWS=rows, BLOCK_N=bn, BLOCK_K=bk, CHUNK=512, AHEAD_STEPS=ahead)
                    for rows, bn, bk, w in [(2, 512, 8, 4), (4, 256, 8, 4)] for ahead in (1, 2)]
UNION_FMA_BUILDS += [dict(num_warps=4, num_stages=1, ROWS=2, BLOCK_N=bn, BLOCK_K=bk, CHUNK=512, STEP_SUM=True)
                     for bn, bk in [(1024, 8), (2048, 4)]]


def union_constexprs(**over) -> dict:
    """The union compact kernel's constexpr arguments as the launcher passes them on a GPU."""
    values = dict(ROWS=16, BLOCK_N=128, BLOCK_K=32, CHUNK=512, HAS_SCALE=False, PER_ROW=False, HAS_BIAS=False,
                  SPLIT=True, FIXED=True, DOT_F32=False, GDC=False, EVICT="", LIST_AHEAD=False, AHEAD_STEPS=1,
                  STEP_SUM=False)
    values.update(over)
    return values


# The kernels the builds above leave out (--others), as the launchers pass them: the walk kernel (one
# row; 16 rows with tl.dot, per-row top-k thresholds, channel scores and R-Sparse's v_t column), the
# compact kernel under programmatic dependent launch (griddepcontrol), R-Sparse's epilogue launch
# (one row; 16 rows with tl.dot; with PDL) and the exact top-k selects (radix; the histogram kernel at
# the largest K it takes).
OTHER_BUILDS = [
    dict(kernel="sparse_gemv_kernel", num_warps=4, num_stages=1, ROWS=1, BLOCK_N=128, BLOCK_K=64),
    dict(kernel="sparse_gemv_kernel", num_warps=4, num_stages=2, ROWS=16, BLOCK_N=128, BLOCK_K=32, HAS_SCALE=True,
         PER_ROW=True, HAS_LOWRANK=True),
    dict(kernel="sparse_gemv_compact_kernel", num_warps=4, num_stages=1, GDC_WAIT=True, GDC_TRIGGER=True),
    # the list steps through Triton's cp.async pipeline (launchers.compact_stages, session 27)
    dict(kernel="sparse_gemv_compact_kernel", num_warps=4, num_stages=3, BLOCK_N=2048, BLOCK_K=4, CHUNK=64,
         STAGES=3),
    # exact top-k selected in the programs (launchers.TOPK_IN_KERNEL, session 28): a bf16 row of 4096
    # channels on Llama-2 qkv's tile and on o_proj's
    dict(kernel="sparse_gemv_compact_kernel", num_warps=4, num_stages=1, PER_ROW=True, TOPK_BLOCK=4096,
         TOPK_LOW_BIT=16, TOPK_TOP_BIT=31),
    dict(kernel="sparse_gemv_compact_kernel", num_warps=8, num_stages=1, BLOCK_N=2048, BLOCK_K=4, CHUNK=32,
         FIXED=False, PER_ROW=True, TOPK_BLOCK=4096, TOPK_LOW_BIT=16, TOPK_TOP_BIT=31),
    dict(kernel="lowrank_up_kernel", num_warps=4, num_stages=1, ROWS=1, GDC=True),
    dict(kernel="lowrank_up_kernel", num_warps=4, num_stages=1, ROWS=16),
    dict(kernel="topk_threshold_kernel", num_warps=8, num_stages=1, BLOCK_K=2048, HAS_SCALE=True),
    dict(kernel="topk_threshold_hist_kernel", num_warps=8, num_stages=1, BLOCK_K=16384, HAS_SCALE=True),
    # a bf16 row without a channel scale (LaRoSA): passes over all 32 score bits, then over the 15 that
    # can be set (launchers.score_bit_span, session 28)
    dict(kernel="topk_threshold_hist_kernel", num_warps=8, num_stages=1, BLOCK_K=16384, LOW_BIT=0, TOP_BIT=32),
    dict(kernel="topk_threshold_hist_kernel", num_warps=8, num_stages=1, BLOCK_K=16384, LOW_BIT=16, TOP_BIT=31),
    # the launcher's select for the down projections' rows since session 31 (launchers.hist_warps,
    # hist_digit_bits): 5-bit digits over the span at 16 warps
    dict(kernel="topk_threshold_hist_kernel", num_warps=16, num_stages=1, BLOCK_K=16384, DIGIT_BITS=5, LOW_BIT=16,
         TOP_BIT=31),
]
# each kernel's module, pointer element types and constexpr defaults (launchers.sparse_gemv,
# launch_lowrank_up, topk_thresholds); the compact kernel's build goes through compact_constexprs
OTHER_KERNELS = {
    "sparse_gemv_kernel": ("sparse_gemv", UNION_POINTERS,
                           dict(ROWS=1, BLOCK_N=128, BLOCK_K=64, HAS_SCALE=False, PER_ROW=False, HAS_BIAS=False,
                                HAS_LOWRANK=False, SPLIT=True, FIXED=True, DOT_F32=False, AHEAD=True, GDC=False,
                                EVICT="")),
    "lowrank_up_kernel": ("sparse_gemv", {"p_y32": "*fp32", "p_z": "*fp32", "p_u": "*bf16", "p_out": "*bf16"},
                          dict(ROWS=1, BLOCK_N=64, BLOCK_R=32, DOT_F32=False, GDC=False)),
    "topk_threshold_kernel": ("topk_select", {"p_x": "*bf16", "p_scale": "*fp32", "p_thr": "*fp32", "p_jcut": "*i32"},
                              dict(HAS_SCALE=False, BLOCK_K=2048, LOW_BIT=0, TOP_BIT=32)),
    "topk_threshold_hist_kernel": ("topk_select", {"p_x": "*bf16", "p_scale": "*fp32", "p_thr": "*fp32",
                                                   "p_jcut": "*i32"}, dict(HAS_SCALE=False, BLOCK_K=16384, DIGIT_BITS=4,
                                                                         LOW_BIT=0, TOP_BIT=32)),
}


# What the JIT specializes on the GPU and a bare signature does not say: every pointer (torch
# allocations) and these integer arguments (model sizes and row strides) are multiples of 16, and the
# unit strides of x and the output are 1. Without these hints the weight loads are not vectorized
# and the register counts are not the GPU's (session 21: the 2-row FMA tile built in 184 registers
# here, 138 on the GPU).
DIVISIBLE_BY_16 = {"N", "K", "R", "ws_cols", "list_cols", "k_per_split", "s_xm", "s_wk", "s_vk", "s_om", "s_un"}
UNIT_STRIDES = {"s_xk": 1, "s_on": 1}


def build_sm90(num_warps: int, num_stages: int = 1, union: bool = False, kernel: str = "", **over) -> dict:
    """Compile the compact kernel (the union compact kernel; `kernel`: one of OTHER_KERNELS) for sm_90 and
    describe the result."""
    if kernel and kernel != "sparse_gemv_compact_kernel":
        module, pointers, defaults = OTHER_KERNELS[kernel]
        constexprs = {**defaults, **over}
    elif union:
        module, kernel, pointers, constexprs = "sparse_gemv", "sparse_gemv_union_compact_kernel", UNION_POINTERS, \
            union_constexprs(**over)
    else:
        module, kernel, pointers, constexprs = "sparse_gemv", "sparse_gemv_compact_kernel", COMPACT_POINTERS, \
            compact_constexprs(num_warps, **over)
    fn = getattr(importlib.import_module(f"vllm_rsparse.kernels.{module}"), kernel)
    return {"kernel": kernel, "num_warps": num_warps, "num_stages": num_stages, **over,
            **compile_sm90(fn, pointers, constexprs, num_warps, num_stages)}


def compile_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """One @triton.jit kernel compiled for sm_90 with the JIT's hints (DIVISIBLE_BY_16, UNIT_STRIDES where
    the kernel has them): registers, stack, local memory, calls and the SASS digest."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise SystemExit("offline_build.py: TRITON_INTERPRET is set; the interpreter's kernels cannot be compiled")
    constexprs = {**constexprs, **{name: v for name, v in UNIT_STRIDES.items() if name in kernel.arg_names}}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name not in constexprs and (name in pointers or name in DIVISIBLE_BY_16)}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        # one dump: the resource usage line (REG:..) and the SASS listing
        dump = subprocess.run([tool, "-res-usage", "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", dump))
    instructions = sass_instructions(dump)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "calls": ptx.count("call.uni"), "sass_instructions": len(instructions),
            # 16-byte global -> shared copies (cp.async): the weight rows of a loop Triton pipelines
            "cp_async_16b": sum(opcode(i).startswith("LDGSTS") and ".128" in opcode(i) for i in instructions),
            "sass_sha1": hashlib.sha1("\n".join(instructions).encode()).hexdigest()[:16], "triton": triton.__version__}


def sass_instructions(sass: str) -> list[str]:
    """cuobjdump -sass's instruction lines without their /*addr*/ prefix and /* encoding */ lines, so
    that the same machine code at other source lines (line info) gives the same list."""
    return [line.split("*/", 1)[1].strip() for line in sass.splitlines()
            if line.lstrip().startswith("/*") and ";" in line]


def opcode(instruction: str) -> str:
    """A SASS instruction's opcode with its modifiers, past a predicate (@P0, @!UP1)."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


# what names a build in a comparison: its tile and switches, not what the compiler made of it
BUILD_RESULTS = {"kernel", "registers", "stack_bytes", "local_bytes", "calls", "sass_instructions", "sass_sha1",
                 "cp_async_16b", "triton"}


def build_name(build: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in build.items() if key not in BUILD_RESULTS)


def compare_markdown(record: dict) -> str:
    """The table of a refactor check: record["runs"] holds, per Triton version, the --json builds of
    the commit before ("before") and after ("after") the change; every build's SASS digest and
    registers side by side (benchmarks/results/offline_build_sass_*.json)."""
    versions = ", ".join(f"{name} {value if isinstance(value, str) else ' / '.join(value)}"
                         for name, value in record["versions"].items())
    lines = [f"# {record['title']}", "", record["what"], "",
             f"Run at {record['commit']}: builds of {record['commit_before']} -> {record['commit_after']}; "
             f"{record['machine']}; {versions}; command: `{record['command']}`.", "",
             "| triton | build | registers | SASS instructions | digest before | digest after | same code |",
             "|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        after = {build_name(b): b for b in run["after"]}
        for b in run["before"]:
            a = after.get(build_name(b), {})
            same = a.get("sass_sha1") == b["sass_sha1"]
            registers = f"{b['registers']}"
            if a.get("registers") != b["registers"]:
                registers += f" -> {a.get('registers')}"
            lines.append(f"| {b['triton']} | {build_name(b)} | {registers} | {b['sass_instructions']} | "
                         f"{b['sass_sha1']} | {a.get('sass_sha1', 'not built')} | {'yes' if same else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--union", action="store_true", help="the union compact kernel's builds instead")
    ap.add_argument("--others", action="store_true",
                    help="the other kernels' builds instead (OTHER_BUILDS: walk, PDL, low-rank epilogue, top-k)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="two --json outputs (two commits, one Triton): a table of their builds' SASS digests, "
                         "exit status 1 if any build's machine code differs")
    args = ap.parse_args()
    if args.compare:
        before, after = (json.load(open(path)) for path in args.compare)
        record = dict(title="sm_90 builds compared", what=f"{args.compare[0]} against {args.compare[1]}.",
                      commit="this checkout", commit_before="(before)", commit_after="(after)", machine="this machine",
                      versions={"triton": sorted({b["triton"] for b in before + after})},
                      command="offline_build.py --compare", runs=[dict(before=before, after=after)])
        print(compare_markdown(record), end="")
        names = {build_name(b): b["sass_sha1"] for b in after}
        raise SystemExit(0 if all(names.get(build_name(b)) == b["sass_sha1"] for b in before) else 1)
    if args.others:
        builds = [build_sm90(**b) for b in OTHER_BUILDS]
    elif args.union:
        builds = [build_sm90(union=True, **b) for b in UNION_BUILDS + UNION_FMA_BUILDS]
    else:
        builds = [build_sm90(**b) for b in BUILDS]
    if args.json:
        print(json.dumps(builds))
    else:
        for b in builds:
            print(b)


if __name__ == "__main__":
    main()
