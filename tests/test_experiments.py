"""The paper's figures (``python -m paper``, ``paper/figures.py``) and the baselines they
compare.

The tiny runs check that every figure runs end to end and that what it measures is
consistent; ``test_digits_faithfulness_targets`` checks the faithfulness targets of
``doc/guide/results.md`` on the full digits set-up (converged recipe), against leave-one-out
retraining (about a minute on 2 cores, in the default run).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paper import problems as setup
from paper.__main__ import main
from paper.figures import FIGURES, run
from paper.training import fit_lbfgs
from skmsif import MultiStageInfluenceEstimator
from skmsif.baselines import IdentityHessianBaseline, PretrainLossBaseline, RandomBaseline
from skmsif.datasets import fashion_mnist_available, load_digits_split

torch.set_num_threads(1)

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist); the "
           "Fashion-MNIST experiments cannot run")


# --------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def trained_case2():
    prob = setup.problem("digits", "tiny", "updated")
    return prob


def test_pretrain_loss_baseline_is_the_cross_entropy(trained_case2):
    prob = trained_case2
    scores = PretrainLossBaseline().fit(prob.pretrain_model, prob.finetune_model, prob.Z,
                                        prob.X).score(prob.x_test)
    with torch.no_grad():
        expected = F.cross_entropy(prob.pretrain_model(torch.as_tensor(prob.Z[0])),
                                   torch.as_tensor(prob.Z[1]), reduction="none").numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert scores.shape == (len(prob.Z[1]),)


def test_random_baseline_is_reproducible(trained_case2):
    prob = trained_case2
    a = RandomBaseline(random_state=0).fit(None, None, prob.Z).score(prob.x_test)
    b = RandomBaseline(random_state=0).fit(None, None, prob.Z).score()
    c = RandomBaseline(random_state=1).fit(None, None, prob.Z).score()
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(prob.Z[1]),) and not np.array_equal(a, c)


def test_identity_baseline_case2_is_the_gradient_product(trained_case2):
    """Case 2 with identity Hessians: I(z) = -2 alpha grad_W f(x_test) . grad_W g(z)."""
    prob = trained_case2
    alpha = prob.estimator_params["alpha"]
    baseline = IdentityHessianBaseline(embedding="updated", alpha=alpha, shared="0")
    scores = baseline.fit(prob.pretrain_model, prob.finetune_model, prob.Z,
                          prob.X).score(prob.x_test)
    fin_w = list(prob.finetune_model[0].parameters())
    test_loss = F.cross_entropy(prob.finetune_model(torch.as_tensor(prob.x_test[0])),
                                torch.as_tensor(prob.x_test[1]), reduction="sum")
    w = torch.cat([g.reshape(-1) for g in torch.autograd.grad(test_loss, fin_w)])
    pre_w = list(prob.pretrain_model[0].parameters())
    expected = []
    for inputs, label in zip(torch.as_tensor(prob.Z[0]), torch.as_tensor(prob.Z[1])):
        loss = F.cross_entropy(prob.pretrain_model(inputs[None]), label[None])
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, pre_w)])
        expected.append(float(-2 * alpha * w.dot(grad)))
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)
    reference = MultiStageInfluenceEstimator(
        embedding="updated", alpha=alpha, shared="0", hessian="identity").fit(
        prob.pretrain_model, prob.finetune_model, prob.Z, prob.X).score(prob.x_test)
    np.testing.assert_array_equal(scores, reference)


# --------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.mark.parametrize("figure", ["fig2", "fig5"])
def test_correlation_figures_run_and_are_faithful(figure, tiny_out):
    result = run(figure, "digits", "tiny", tiny_out)
    saved = json.loads((tiny_out / f"{figure}-digits-tiny.json").read_text())
    assert (tiny_out / f"{figure}-digits-tiny.png").stat().st_size > 1000
    cfg = setup.CONFIGS["digits", "tiny"]
    assert len(saved["audit"]["indices"]) == cfg["n_top"] + cfg["n_random"]
    assert set(saved["metrics"]) == {"multi-stage", "identity", "pretrain loss", "random"}
    assert saved["leave_one_out"]["converged"]
    metrics = result["metrics"]["multi-stage"]
    assert metrics["all"]["n"] == cfg["n_top"] + cfg["n_random"]
    # A converged, exact-Hessian problem: influence follows leave-one-out closely.
    assert metrics["all"]["pearson"] > 0.9
    assert metrics["top"]["pearson"] > 0.9
    # The predicted changes have the right sign (removals of the tiny problem are large
    # enough to be non-linear, so the scale is only roughly right).
    assert metrics["all"]["slope"] > 0.2
    audit = saved["audit"]
    top = np.abs(audit["actual"])[audit["groups"]["top"]]
    rest = np.abs(audit["actual"])[audit["groups"]["random"]]
    assert np.median(top) > np.median(rest)


def test_fig4_reuses_the_cached_retrains(tiny_out):
    run("fig2", "digits", "tiny", tiny_out)
    result = run("fig4", "digits", "tiny", tiny_out)
    assert result["highlight"] == "identity"
    assert result["leave_one_out"]["from_cache"] == result["leave_one_out"]["n_retrains"] - 1
    fig2 = json.loads((tiny_out / "fig2-digits-tiny.json").read_text())
    np.testing.assert_allclose(result["audit"]["actual"], fig2["audit"]["actual"])


def test_fig3_explains_misclassified_examples(tiny_out):
    result = run("fig3", "digits", "tiny", tiny_out)
    cfg = setup.CONFIGS["digits", "tiny"]
    assert 1 <= len(result["rows"]) <= cfg["n_explained"]
    for row in result["rows"]:
        assert row["label"] != row["predicted"]
        influence = np.asarray(row["harmful_influence"])
        assert len(influence) == cfg["n_shown"]
        assert np.all(np.diff(influence) <= 0) and influence[0] > 0
    assert (tiny_out / "fig3-digits-tiny.png").is_file()


def test_fig6_and_fig7_report_mean_absolute_influence(tiny_out):
    six = run("fig6", "digits", "tiny", tiny_out)
    assert set(six["tasks"]) == {"A", "B"}
    assert six["tasks"]["A"]["n_finetune"] == six["tasks"]["B"]["n_finetune"]
    assert six["tasks"]["A"]["n_test"] == six["tasks"]["B"]["n_test"]
    assert six["ratio_mean_abs"] == pytest.approx(
        six["tasks"]["A"]["mean_abs"] / six["tasks"]["B"]["mean_abs"])
    seven = run("fig7", "digits", "tiny", tiny_out)
    assert seven["models"]["D"]["n_finetune"] == 3 * seven["models"]["C"]["n_finetune"]
    for values in list(six["tasks"].values()) + list(seven["models"].values()):
        assert np.isfinite(values["mean_abs"]) and values["mean_abs"] > 0
    assert (tiny_out / "fig6-digits-tiny.png").is_file()
    assert (tiny_out / "fig7-digits-tiny.png").is_file()


def test_command_line(tiny_out, capsys):
    assert main(["fig2", "--dataset", "digits", "--size", "tiny", "--out",
                 str(tiny_out)]) == 0
    printed = capsys.readouterr().out
    assert "fig2 (digits, tiny)" in printed and "multi-stage" in printed
    with pytest.raises(SystemExit):
        main(["fig9"])
    with pytest.raises(ValueError, match="fig9"):
        run("fig9")
    assert sorted(FIGURES) == ["fig2", "fig3", "fig4", "fig5", "fig6", "fig7"]


@needs_fashion_mnist
def test_fashion_mnist_tiny_runs(tiny_out):
    result = run("fig2", "fashion-mnist", "tiny", tiny_out)
    assert result["estimator"]["hessian"] == {"pretrain": "cg", "finetune": "cg"}
    for method in ("multi-stage", "identity"):
        assert result["metrics"][method]["all"]["n"] == 6
    assert np.all(np.isfinite(result["audit"]["actual"]))
    assert (tiny_out / "fig2-fashion-mnist-tiny.png").is_file()


# --------------------------------------------------------------------------- full digits


@pytest.mark.parametrize("case, target", [("fixed", 0.95), ("updated", 0.9)])
def test_digits_faithfulness_targets(case, target, tmp_path):
    """The targets of doc/guide/results.md: converged recipe, top-30 + random-30 removals."""
    figure = "fig2" if case == "fixed" else "fig5"
    result = run(figure, "digits", "full", tmp_path, n_jobs=2)
    metrics = result["metrics"]
    print({method: {g: round(v["pearson"], 4) for g, v in groups.items()}
           for method, groups in metrics.items()})
    assert result["leave_one_out"]["converged"]
    assert metrics["multi-stage"]["all"]["pearson"] >= target
    assert metrics["multi-stage"]["top"]["pearson"] >= target
    assert (metrics["multi-stage"]["all"]["pearson"]
            >= metrics["identity"]["all"]["pearson"] + 0.3)
    for baseline in ("pretrain loss", "random"):
        assert metrics["multi-stage"]["all"]["pearson"] > metrics[baseline]["all"]["pearson"]


def test_fit_lbfgs_digits_data_types():
    """The experiments' data feed the training helper without casts."""
    data = load_digits_split(0, n_pretrain=30, n_finetune=10, n_test=10)
    _, model, _ = setup._models("digits", setup.config("digits", "tiny"), 4, 6, 0)
    info = fit_lbfgs(model, data.Z, damping=0.1, tol=1e-8)
    assert info["converged"]
