"""Scale machinery: chunking, parallel and distributed scoring, memmap output, low rank,
cached features, and the CUDA path. Every result must equal the plain serial one."""

import os

import joblib
import numpy as np
import pytest
import torch
from _models import tiny_problem
from sklearn.base import clone
from torch import nn

from skmsif import MultiStageInfluenceEstimator
from skmsif import _estimator as estimator_module


def _relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def problem():
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem(m=40, n_test=12)
    estimator = MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-2)
    estimator.fit(pretrain_model, finetune_model, Z, X)
    return pretrain_model, finetune_model, Z, X, x_test, estimator


def test_results_do_not_depend_on_batch_size_or_n_jobs(problem):
    pretrain_model, finetune_model, Z, X, x_test, reference = problem
    expected = reference.influence(x_test)
    for batch_size, n_jobs in [(1, 1), (7, 1), (5, 2), (256, 2)]:
        estimator = clone(reference).set_params(batch_size=batch_size, n_jobs=n_jobs)
        got = estimator.fit(pretrain_model, finetune_model, Z, X).influence(x_test)
        assert _relative(got, expected) < 1e-10, (batch_size, n_jobs)


def test_dask_cluster_gives_the_serial_result(problem):
    distributed = pytest.importorskip(
        "dask.distributed", reason="dask[distributed] is not installed")
    pretrain_model, finetune_model, Z, X, x_test, reference = problem
    expected = reference.score(x_test)
    estimator = clone(reference).set_params(n_jobs=-1, batch_size=8)
    estimator.fit(pretrain_model, finetune_model, Z, X)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            with joblib.parallel_config(backend="dask"):
                got = estimator.score(x_test)
    assert _relative(got, expected) < 1e-10


def test_memmap_output_resumes_after_an_interruption(problem, tmp_path, monkeypatch):
    pretrain_model, finetune_model, Z, X, x_test, reference = problem
    expected = reference.influence(x_test)
    estimator = clone(reference).set_params(batch_size=5)  # chunks of 5, 5, 2 test points
    estimator.fit(pretrain_model, finetune_model, Z, X)
    out = tmp_path / "influence.npy"
    original = estimator_module._FittedState.influence
    calls = []

    def failing_on_second_chunk(self, data, summed):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, data, summed)

    monkeypatch.setattr(estimator_module._FittedState, "influence",
                        failing_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        estimator.influence(x_test, out=out)
    assert not out.exists(), "a half-written result must not appear under its final name"
    assert os.path.exists(str(out) + ".partial")

    calls.clear()
    monkeypatch.setattr(estimator_module._FittedState, "influence",
                        lambda self, data, summed: calls.append(len(data))
                        or original(self, data, summed))
    got = estimator.influence(x_test, out=out)
    assert calls == [5, 2], "finished chunks must not be recomputed"
    assert isinstance(got, np.memmap)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)
    assert sorted(os.listdir(tmp_path)) == ["influence.npy"]


def test_memmap_does_not_resume_a_different_computation(problem, tmp_path):
    pretrain_model, finetune_model, Z, X, x_test, reference = problem
    out = tmp_path / "influence.npy"
    partial = str(out) + ".partial"
    np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64,
                              shape=(12, 40))[:] = 123.0
    with open(str(out) + ".progress.json", "w") as handle:
        handle.write('{"fingerprint": "another run", "done": [0, 1, 2]}')
    got = clone(reference).set_params(batch_size=5).fit(
        pretrain_model, finetune_model, Z, X).influence(x_test, out=out)
    np.testing.assert_allclose(np.asarray(got), reference.influence(x_test), rtol=1e-10)


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_lowrank_at_full_rank_equals_exact(case):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem(case)
    params = {"finetune_damping": 1e-2, "random_state": 0}
    if case == "updated":
        params.update(embedding="updated", shared="0")
    exact = MultiStageInfluenceEstimator(hessian="exact", **params).fit(
        pretrain_model, finetune_model, Z, X)
    lowrank = MultiStageInfluenceEstimator(hessian="lowrank", rank=1000, **params).fit(
        pretrain_model, finetune_model, Z, X)
    assert lowrank.pretrain_solver_.eigenvalues_.numel() == 31
    assert _relative(lowrank.influence(x_test), exact.influence(x_test)) < 1e-8
    # Truncating the spectrum changes the answer (the rank is really used).
    truncated = MultiStageInfluenceEstimator(hessian="lowrank", rank=5, **params).fit(
        pretrain_model, finetune_model, Z, X)
    assert _relative(truncated.influence(x_test), exact.influence(x_test)) > 1e-3


class _NotSequential(nn.Module):
    def __init__(self, embedding, head):
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, inputs):
        return self.head(self.embedding(inputs))


@pytest.mark.parametrize("hessian", ["exact", "cg"])
def test_cached_embedding_features_give_the_whole_network_result(hessian):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem()
    cached = MultiStageInfluenceEstimator(hessian=hessian, finetune_damping=1e-2).fit(
        pretrain_model, finetune_model, Z, X)
    assert cached.features_cached_
    whole_model = _NotSequential(finetune_model[0], finetune_model[1])
    whole = clone(cached).fit(pretrain_model, whole_model, Z, X)
    assert not whole.features_cached_
    assert _relative(cached.influence(x_test), whole.influence(x_test)) < 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine; the GPU path is checked on "
                           "a GPU machine with `pytest tests/test_scale.py -k cuda`")
@pytest.mark.parametrize("hessian,curvature", [
    ("exact", "hessian"), ("cg", "hessian"), ("lowrank", "hessian"),
    ("exact", "gauss_newton"), ("cg", "gauss_newton"), ("kfac", "auto"), ("ekfac", "auto")])
def test_cuda_matches_cpu(problem, hessian, curvature):
    pretrain_model, finetune_model, Z, X, x_test, reference = problem
    cpu = clone(reference).set_params(hessian=hessian, curvature=curvature, rank=1000).fit(
        pretrain_model, finetune_model, Z, X)
    cuda = clone(cpu).set_params(device="cuda").fit(pretrain_model, finetune_model, Z, X)
    assert _relative(cuda.influence(x_test), cpu.influence(x_test)) < 1e-8
