"""The OpenAI-compatible vLLM server with an rsparse checkpoint, as a subprocess."""

from __future__ import annotations

import json
import urllib.request

import pytest

from vllm_rsparse.serving import VLLMServer

pytestmark = pytest.mark.vllm

SERVER_ARGS = ["--enforce-eager", "--max-model-len", "512", "--max-num-batched-tokens", "512",
               "--dtype", "bfloat16", "--max-num-seqs", "8"]


def post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_server_answers_completions_and_chat(calibrated_dirs, tmp_path):
    ckpt = str(calibrated_dirs[0.5])
    server = VLLMServer(ckpt, extra_args=SERVER_ARGS, log_path=tmp_path / "server.log")
    with server:
        models = json.loads(urllib.request.urlopen(server.url + "/v1/models", timeout=30).read())
        assert models["data"][0]["id"] == ckpt
        completion = post(server.url + "/v1/completions",
                          {"model": ckpt, "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0})
        assert completion["choices"][0]["text"].strip()
        assert completion["usage"]["completion_tokens"] == 8
        chat = post(server.url + "/v1/chat/completions",
                    {"model": ckpt, "messages": [{"role": "user", "content": "Say hello."}],
                     "max_tokens": 8, "temperature": 0})
        assert chat["choices"][0]["message"]["content"].strip()
        pid = server.pid
    # stopped by its PID: the process is gone
    assert server.process.poll() is not None
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "rsparse" in (tmp_path / "server.log").read_text()
