"""Faults and hostile input: nothing is lost, nothing executes, errors name the problem."""

from __future__ import annotations

import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_helpers import make_llm
from vllm_rsparse.checkpoint import validate_checkpoint


class _PlantedPayload:
    """Unpickling this runs code (touches a marker file): a checkpoint loader must never."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.vllm
def test_planted_pickle_files_are_never_opened(calibrated_dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(calibrated_dirs[0.5], ckpt)
    marker = tmp_path / "code-was-executed"
    for name in ("pytorch_model.bin", "rsparse.pt", "training_args.bin"):
        with open(ckpt / name, "wb") as f:
            pickle.dump({"weights": _PlantedPayload(marker)}, f)
    assert validate_checkpoint(ckpt)
    with make_llm(ckpt) as llm:
        from vllm import SamplingParams

        out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert not marker.exists()


def test_interrupted_calibration_leaves_nothing_loadable_and_rerun_works(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "vllm_rsparse.calibration", str(tiny_model_dir), "-o", str(out),
           "--num-samples", "64", "--seq-len", "256"]
    # The child gets Python's Ctrl-C handler whatever it inherits: a test run started in the
    # background by a non-interactive shell has SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored, so the interrupt would be lost and the calibration would finish (a false failure).
    interruptible = [sys.executable, "-c",
                     "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "sys.argv = ['rsparse-calibrate', *sys.argv[1:]]; "
                     "runpy.run_module('vllm_rsparse.calibration', run_name='__main__')", *cmd[3:]]
    proc = subprocess.Popen(interruptible, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until calibration is under way (its progress bar), then Ctrl-C it.
    deadline = time.time() + 180
    seen = ""
    while time.time() < deadline and "histograms" not in seen:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "histograms" in seen, seen[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; no checkpoint was written" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    # a rerun succeeds and writes a valid checkpoint
    rerun = subprocess.run(cmd[:-4] + ["--num-samples", "2", "--seq-len", "128"], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert validate_checkpoint(out)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    from gguf import GGUFWriter

    path = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from vllm_rsparse.calibration.cli import main

    assert main([str(path), "-o", str(tmp_path / "out")]) == 2
    assert "GGUF architecture 'phi2' is not supported" in capsys.readouterr().err


@pytest.mark.vllm
def test_tensor_parallel_size_that_does_not_divide_the_shapes_is_refused(calibrated_dirs):
    """SmolLM2 has 9 query heads: tensor_parallel_size=2 cannot split them. Refused
    before anything loads, with a message naming the sizes."""
    with pytest.raises(Exception, match=r"(?s)attention heads \(9\) must be divisible by tensor parallel size \(2\)"):
        with make_llm(calibrated_dirs[0.5], tensor_parallel_size=2):
            pass


def _stream_first_chunks(url: str, model: str, prompt: str, chunks: int) -> list[str]:
    """Open a streaming completion and return after `chunks` SSE data lines (mid-stream)."""
    import json
    import urllib.request

    payload = {"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True,
               "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    got = []
    resp = urllib.request.urlopen(req, timeout=120)
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            got.append(json.loads(line[6:])["choices"][0]["text"])
            if len(got) >= chunks:
                break
    return got


def _complete(url: str, model: str, prompt: str) -> str:
    import json
    import urllib.request

    payload = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["text"]


@pytest.mark.vllm
def test_server_killed_mid_stream_restarts_with_the_same_answers(calibrated_dirs, tmp_path):
    from vllm_rsparse.serving import VLLMServer

    ckpt = str(calibrated_dirs[0.5])
    args = ["--enforce-eager", "--max-model-len", "512", "--max-num-batched-tokens", "512",
            "--dtype", "bfloat16", "--max-num-seqs", "4", "--no-enable-prefix-caching"]
    prompts = ["The capital of France is", "In 1850 the river", "Photosynthesis converts"]
    server = VLLMServer(ckpt, extra_args=args, log_path=tmp_path / "first.log").start()
    try:
        before = [_complete(server.url, ckpt, p) for p in prompts]
        assert len(_stream_first_chunks(server.url, ckpt, "Once upon a time", 3)) == 3
        server.stop(sig=signal.SIGKILL)  # mid-stream: the stream above is still open
    finally:
        server.stop(sig=signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    with VLLMServer(ckpt, extra_args=args, log_path=tmp_path / "second.log") as restarted:
        after = [_complete(restarted.url, ckpt, p) for p in prompts]
    assert after == before
