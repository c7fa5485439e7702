"""A tiny-size smoke run of the benchmark: it must run end to end and print every row."""

import subprocess
import sys
from pathlib import Path

import pytest

from skmsif.datasets import fashion_mnist_available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="Fashion-MNIST is not installed (apt-get install "
                           "dataset-fashion-mnist); the benchmark needs it")
def test_bench_scale_runs_at_tiny_size():
    result = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--threads", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("(a) training epoch", "(b) scoring pass over Z, 1 vector",
                "(b) scoring pass over Z, 100 vector", "(c) score", "(d) (20, m) influence",
                "(e) naive", "(f) peak resident memory"):
        assert row in result.stdout, (row, result.stdout)
