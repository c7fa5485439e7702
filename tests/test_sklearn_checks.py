"""scikit-learn's common estimator checks (``sklearn.utils.estimator_checks``).

Every check that applies runs as is. The checks that call ``fit(X, y)`` with one numeric
array cannot apply: the estimator's ``fit(pretrain_model, finetune_model, Z, X)`` takes two
models and two data sets, and ``AuditedInfluenceRegressor.fit`` needs those as fit
parameters. They are listed in ``INAPPLICABLE`` with the reason (pytest shows them as
xfail), and the properties they protect that still make sense are tested below with the
real fit signature (and in ``test_persistence.py`` for pickling). ``doc/guide/design.md``
has the same table.
"""

import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse
from _models import tiny_problem
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from skmsif import MultiStageInfluenceEstimator, StationarityWarning
from skmsif.model_selection import AuditedInfluenceRegressor

_SIGNATURE = ("fit takes (pretrain_model, finetune_model, Z, X), not one numeric array X "
              "and y")
_FIT_PARAMS = ("fit needs the models and data as the fit parameters pretrain_model, "
               "finetune_model, Z, X_finetune and x_test, which the check cannot supply")
_RETESTED = " (the property is tested here with the real fit signature)"

# Checks that call fit(X, y) on a generated numeric array; both estimators.
_FIT_CHECKS = {
    "check_fit_score_takes_y": "",
    "check_estimators_fit_returns_self": _RETESTED,
    "check_estimators_overwrite_params": _RETESTED,
    "check_dont_overwrite_parameters": _RETESTED,
    "check_dict_unchanged": _RETESTED,
    "check_fit_idempotent": _RETESTED,
    "check_fit_check_is_fitted": _RETESTED,
    "check_estimators_pickle": " (test_persistence.py round-trips fitted estimators)",
    "check_readonly_memmap_input": _RETESTED,
    "check_estimators_dtypes": _RETESTED,
    "check_methods_sample_order_invariance": _RETESTED,
    "check_methods_subset_invariance": _RETESTED,
    "check_estimators_nan_inf": _RETESTED,
    "check_estimators_empty_data_messages": _RETESTED,
    "check_complex_data": _RETESTED,
    "check_dtype_object": _RETESTED,
    "check_estimator_sparse_tag": _RETESTED,
    "check_estimator_sparse_array": _RETESTED,
    "check_estimator_sparse_matrix": _RETESTED,
    "check_pipeline_consistency": " (a Pipeline cannot end in an estimator whose fit takes "
                                  "models)",
    "check_n_features_in": " (inputs go to a torch module of any input shape; there is "
                           "no n_features_in_)",
    "check_n_features_in_after_fitting": " (no n_features_in_, as above)",
    "check_f_contiguous_array_estimator": " (data are copied into contiguous tensors)",
    "check_fit2d_1sample": "",
    "check_fit2d_1feature": "",
    "check_fit1d": "",
    "check_fit2d_predict1d": "",
    "check_positive_only_tag_during_fit": "",
}
# Regressor checks that fit on generated data; AuditedInfluenceRegressor only.
_REGRESSOR_CHECKS = {
    "check_regressors_train": "",
    "check_regressor_data_not_an_array": "",
    "check_regressors_no_decision_function": "",
    "check_supervised_y_2d": "",
    "check_supervised_y_no_nan": _RETESTED,
    "check_regressors_int": "",
    "check_requires_y_none": "",
}


def inapplicable(estimator):
    if isinstance(estimator, AuditedInfluenceRegressor):
        checks = {**_FIT_CHECKS, **_REGRESSOR_CHECKS}
        return {name: _FIT_PARAMS + why for name, why in checks.items()}
    return {name: _SIGNATURE + why for name, why in _FIT_CHECKS.items()}


@parametrize_with_checks([MultiStageInfluenceEstimator(), AuditedInfluenceRegressor()],
                         expected_failed_checks=inapplicable)
def test_sklearn_common_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        check(estimator)


# ----------------------------------------------------- the same properties, real fit


def _estimator(**params):
    settings = {"hessian": "exact", "pretrain_damping": 0.5, "finetune_damping": 0.5}
    settings.update(params)
    return MultiStageInfluenceEstimator(**settings)


def _numpy(data):
    return data[0].numpy(), data[1].numpy()


@pytest.fixture
def problem():
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem("fixed")
    return pretrain_model, finetune_model, _numpy(Z), _numpy(X), _numpy(x_test)


def _regressor_fit(problem):
    pretrain_model, finetune_model, Z, X, x_test = problem
    return {"pretrain_model": pretrain_model, "finetune_model": finetune_model, "Z": Z,
            "X_finetune": X, "x_test": x_test}


def _public(estimator):
    return {k: v for k, v in vars(estimator).items()
            if not k.startswith("_") and not k.endswith("_")}


@pytest.mark.parametrize("hessian", ["exact", "cg", "identity"])
def test_fit_returns_self_keeps_parameters_and_sets_only_fitted_attributes(problem,
                                                                           hessian):
    estimator = _estimator(hessian=hessian, shared=None, random_state=0)
    params = estimator.get_params()
    hashed = joblib.hash(params)
    assert estimator.fit(*problem[:4]) is estimator
    assert joblib.hash(estimator.get_params()) == hashed
    assert estimator.get_params() == params
    assert _public(estimator) == params  # every new public attribute ends with "_"
    check_is_fitted(estimator)

    regressor = AuditedInfluenceRegressor(_estimator(hessian=hessian))
    params = regressor.get_params(deep=False)
    assert regressor.fit(np.arange(5), np.arange(5.0), **_regressor_fit(problem)) \
        is regressor
    assert regressor.get_params(deep=False)["estimator"] is params["estimator"]
    assert not hasattr(params["estimator"], "hessian_")  # the given estimator is unfitted
    assert _public(regressor) == params
    check_is_fitted(regressor)


def test_scoring_does_not_change_the_fitted_state_and_fit_is_idempotent(problem):
    estimator = _estimator().fit(*problem[:4])
    x_test = problem[4]
    before = dict(vars(estimator))
    scores = estimator.score(x_test)
    estimator.influence(x_test)
    assert vars(estimator).keys() == before.keys()
    assert all(vars(estimator)[k] is v for k, v in before.items())
    np.testing.assert_array_equal(estimator.fit(*problem[:4]).score(x_test), scores)

    regressor = AuditedInfluenceRegressor(_estimator())
    regressor.fit(np.arange(5), np.arange(5.0), **_regressor_fit(problem))
    before = dict(vars(regressor))
    predicted = regressor.predict(np.arange(5))
    regressor.score(np.arange(5), np.arange(5.0))
    assert all(vars(regressor)[k] is v for k, v in before.items())
    regressor.fit(np.arange(5), np.arange(5.0), **_regressor_fit(problem))
    np.testing.assert_array_equal(regressor.predict(np.arange(5)), predicted)


def test_unfitted_estimators_raise_not_fitted(problem):
    with pytest.raises(NotFittedError):
        _estimator().score(problem[4])
    with pytest.raises(NotFittedError):
        AuditedInfluenceRegressor().predict([0])


def test_readonly_memmap_inputs_give_the_same_scores(problem, tmp_path):
    pretrain_model, finetune_model, Z, X, x_test = problem
    joblib.dump((Z, X), tmp_path / "data.joblib")
    Z_map, X_map = joblib.load(tmp_path / "data.joblib", mmap_mode="r")
    assert not Z_map[0].flags.writeable
    expected = _estimator().fit(pretrain_model, finetune_model, Z, X).score(x_test)
    estimator = _estimator()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "not writable" warning
        warnings.simplefilter("ignore", StationarityWarning)  # untrained models
        estimator.fit(pretrain_model, finetune_model, Z_map, X_map)
    np.testing.assert_array_equal(estimator.score(x_test), expected)


def test_readonly_memmap_inputs_are_not_aliased(problem, tmp_path):
    pretrain_model, finetune_model, Z, X, _ = problem
    joblib.dump((Z, X), tmp_path / "data.joblib")
    Z_map, X_map = joblib.load(tmp_path / "data.joblib", mmap_mode="r")
    estimator = _estimator().fit(pretrain_model, finetune_model, Z_map, X_map)
    assert not np.shares_memory(estimator._state.Z.inputs.numpy(), Z_map[0])


def test_dtypes_of_inputs_and_labels(problem):
    pretrain_model, finetune_model, Z, X, x_test = problem
    expected = _estimator().fit(pretrain_model, finetune_model, Z, X).score(x_test)
    for inputs_dtype in (np.float32, np.float64):
        for labels_dtype in (np.int32, np.int64, np.uint8):
            def cast(data):
                return data[0].astype(inputs_dtype), data[1].astype(labels_dtype)

            got = _estimator().fit(pretrain_model, finetune_model, cast(Z), cast(X)).score(
                cast(x_test))
            tolerance = 1e-4 if inputs_dtype == np.float32 else 0
            np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)


def test_sample_order_and_subset_invariance(problem):
    pretrain_model, finetune_model, Z, X, x_test = problem
    estimator = _estimator().fit(pretrain_model, finetune_model, Z, X)
    influence = estimator.influence(x_test)
    order = np.random.default_rng(0).permutation(len(Z[0]))
    permuted = _estimator().fit(pretrain_model, finetune_model, (Z[0][order], Z[1][order]),
                                X).influence(x_test)
    np.testing.assert_allclose(permuted, influence[:, order], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(estimator.influence((x_test[0][:2], x_test[1][:2])),
                               influence[:2], rtol=1e-12, atol=1e-14)

    regressor = AuditedInfluenceRegressor(_estimator()).fit(
        np.arange(5), np.arange(5.0), **_regressor_fit(problem))
    indices = np.array([4, 0, 7, 2])
    np.testing.assert_array_equal(regressor.predict(indices)[::-1],
                                  regressor.predict(indices[::-1]))
    np.testing.assert_array_equal(regressor.predict(indices[:2]),
                                  regressor.predict(indices)[:2])


@pytest.mark.parametrize("bad, error, match", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), ValueError,
     "NaN or infinite"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x), ValueError,
     "NaN or infinite"),
    (lambda x: x[:0], ValueError, "empty"),
    (lambda x: x.astype(object), TypeError, "dtype object"),
    (lambda x: x.astype(np.complex128), ValueError, "could not be evaluated"),
    (scipy.sparse.csr_matrix, TypeError, "numeric numpy arrays or torch tensors"),
])
def test_bad_inputs_fail_with_a_message(problem, bad, error, match):
    pretrain_model, finetune_model, Z, X, _ = problem
    targets = Z[1][:0] if match == "empty" else Z[1]
    with pytest.raises(error, match=match):
        _estimator().fit(pretrain_model, finetune_model, (bad(Z[0]), targets), X)


def test_clone_keeps_parameters_of_the_nested_estimator():
    regressor = AuditedInfluenceRegressor(_estimator(alpha=0.3), metric="pearson")
    cloned = clone(regressor)
    assert cloned.get_params()["estimator__alpha"] == 0.3
    assert cloned.estimator is not regressor.estimator
    cloned.set_params(estimator__alpha=0.7)
    assert regressor.estimator.alpha == 0.3
