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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
