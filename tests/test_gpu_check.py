"""benchmarks/gpu_check.sh, the prepared GPU check, runs end to end: here on the CPU with the
tiny model (fp32, aot_eager compile), so the script is known to work before a GPU is lent."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_with_tiny_model():
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", MODEL="tiny", DTYPE="fp32", BUDGET="256",
               STEPS="1", WARMUP="1", ENCODER_REPS="1", PEAK_SIZES="256", COMPILE_BACKEND="aot_eager",
               LENGTH_MULTIPLE="32", CONFIG_TIMEOUT="900", PEAKS_TIMEOUT="900")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for dt in ("fp32", "bf16", "fp16"):
        # a figure is printed (its size depends on the machine's load: not asserted)
        assert re.search(rf"matmul peak {dt}\s+on cpu.*?:\s+[\d.]+ GFLOP/s \(square n=256\)", out), dt
    for name in ("padded, eager", "padded, compiled", "packed, eager", "packed, compiled"):
        assert f"== UNITER-tiny mlm step, fp32, {name}" in out
    blocks = out.split("== UNITER-tiny")[1:]
    assert len(blocks) == 4
    for block in blocks:
        frac = re.search(r"achieved\s+[\d.]+ GFLOP/s = ([\d.]+)% of the run's best matmul peak", block)
        assert frac and 0 <= float(frac.group(1)) <= 100, block
        assert re.search(r"peak memory \(.*\): step adds \d+ MiB", block), block
        assert re.search(r"FLOPs/step \(fvcore forward x2 x3\): [\d.]+ GFLOP useful", block), block
    packed = [b for b in blocks if "packed (real tokens only)" in b]
    assert len(packed) == 2 and all("real units" in b for b in packed)
    graphs = re.findall(r"torch.compile \(aot_eager\): (\d+) graph\(s\) compiled", out)
    assert len(graphs) == 2 and all(int(g) >= 1 for g in graphs)
    assert "all configurations ran" in out
