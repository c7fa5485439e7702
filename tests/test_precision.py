"""float32 passes with float64 solves give the float64 numbers to float32 accuracy."""

import warnings

import numpy as np
import pytest
import torch
from _models import tiny_problem

from skmsif import MultiStageInfluenceEstimator, StationarityWarning

torch.set_num_threads(1)


@pytest.mark.parametrize("case", ["fixed", "updated"])
@pytest.mark.parametrize("hessian", ["exact", "cg", "lowrank", "identity", "ekfac"])
def test_float32_passes_agree_with_float64(case, hessian):
    problem = tiny_problem(case)
    params = dict(embedding=case, hessian=hessian, shared=None if case == "fixed" else "0",
                  finetune_damping=1e-2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StationarityWarning)  # untrained tiny models
        wide = MultiStageInfluenceEstimator(dtype="float64", **params).fit(*problem[:4])
        narrow = MultiStageInfluenceEstimator(dtype="float32", **params).fit(*problem[:4])
    expected, got = wide.influence(problem[4]), narrow.influence(problem[4])
    assert got.dtype == np.float64
    assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)
