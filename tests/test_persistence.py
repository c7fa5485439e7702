"""Fitted estimators survive ``pickle`` and ``joblib.dump`` / ``joblib.load`` with identical
scores, and ``clone`` of a fitted estimator is unfitted."""

import os
import pickle
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
from _models import tiny_problem
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

import skmsif
from skmsif import MultiStageInfluenceEstimator
from skmsif.model_selection import AuditedInfluenceRegressor

FITTED_ATTRIBUTES = ("hessian_", "n_pretrain_", "n_finetune_", "shared_parameters_",
                     "n_params_", "hessian_indices_")


def _fitted(case, hessian, **params):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem(case)
    shared = {"shared": "0"} if case == "updated" else {}
    estimator = MultiStageInfluenceEstimator(
        embedding=case, hessian=hessian, pretrain_damping=0.5, finetune_damping=0.5,
        alpha=0.1, **shared, **params)
    return estimator.fit(pretrain_model, finetune_model, Z, X), x_test


def _round_trips(estimator, tmp_path):
    path = tmp_path / "estimator.joblib"
    joblib.dump(estimator, path)
    return {"pickle": pickle.loads(pickle.dumps(estimator)), "joblib": joblib.load(path)}


@pytest.mark.parametrize("case", ["fixed", "updated"])
@pytest.mark.parametrize("hessian", ["exact", "cg", "identity", "preconditioned cg"])
def test_round_trips_give_identical_scores(case, hessian, tmp_path):
    params = {}
    if hessian == "preconditioned cg":
        hessian, params = "cg", dict(iterative_solver="cg", curvature="gauss_newton",
                                     preconditioner="ekfac")
    estimator, x_test = _fitted(case, hessian, hessian_samples=15, random_state=0,
                                **params)
    scores, influence = estimator.score(x_test), estimator.influence(x_test)
    for how, loaded in _round_trips(estimator, tmp_path).items():
        np.testing.assert_array_equal(loaded.score(x_test), scores, err_msg=how)
        np.testing.assert_array_equal(loaded.influence(x_test), influence, err_msg=how)
        assert loaded.get_params() == estimator.get_params()
        for name in FITTED_ATTRIBUTES:
            np.testing.assert_equal(getattr(loaded, name), getattr(estimator, name))


def test_loaded_in_a_fresh_process_gives_identical_scores(tmp_path):
    estimator, x_test = _fitted("updated", "cg")
    joblib.dump((estimator, x_test, estimator.score(x_test)), tmp_path / "fitted.joblib")
    script = textwrap.dedent(f"""
        import joblib, numpy as np
        estimator, x_test, scores = joblib.load({str(tmp_path / "fitted.joblib")!r})
        np.testing.assert_array_equal(estimator.score(x_test), scores)
        print("same")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(skmsif.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env, cwd=str(tmp_path), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "same"


def test_clone_of_a_fitted_estimator_is_unfitted():
    estimator, x_test = _fitted("fixed", "exact")
    cloned = clone(estimator)
    assert cloned.get_params() == estimator.get_params()
    for name in FITTED_ATTRIBUTES:
        assert not hasattr(cloned, name)
    with pytest.raises(NotFittedError):
        check_is_fitted(cloned)
    with pytest.raises(NotFittedError):
        cloned.score(x_test)
    check_is_fitted(estimator)  # the original stays fitted


def test_audited_regressor_round_trips_and_clones(tmp_path):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem("fixed")
    regressor = AuditedInfluenceRegressor(MultiStageInfluenceEstimator(
        hessian="exact", pretrain_damping=0.5, finetune_damping=0.5), metric="pearson")
    indices, change = np.arange(6), np.linspace(-1, 1, 6)
    regressor.fit(indices, change, pretrain_model=pretrain_model,
                  finetune_model=finetune_model, Z=Z, X_finetune=X, x_test=x_test)
    for how, loaded in _round_trips(regressor, tmp_path).items():
        np.testing.assert_array_equal(loaded.predict(indices), regressor.predict(indices))
        assert loaded.score(indices, change) == regressor.score(indices, change), how
    cloned = clone(regressor)
    assert not hasattr(cloned, "scores_")
    with pytest.raises(NotFittedError):
        cloned.predict(indices)


def test_estimator_fitted_on_a_skorch_pipeline_round_trips(tmp_path):
    skorch = pytest.importorskip(
        "skorch", reason="skorch is not installed (pip install skorch, or the test extra)")
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torch import nn

    pretrain_model, finetune_model, Z, X, x_test = tiny_problem("fixed")
    net = skorch.NeuralNetClassifier(finetune_model, criterion=nn.CrossEntropyLoss,
                                     train_split=None).initialize()
    scaler = StandardScaler().fit(X[0].numpy() * 3 + 1)
    pipeline = make_pipeline(scaler, net)
    estimator = MultiStageInfluenceEstimator(hessian="exact", pretrain_damping=0.5,
                                             finetune_damping=0.5)
    estimator.fit(pretrain_model, pipeline, Z, X)
    scores = estimator.score(x_test)
    for how, loaded in _round_trips(estimator, tmp_path).items():
        np.testing.assert_array_equal(loaded.score(x_test), scores, err_msg=how)
