"""Turn-over dropout against the multi-stage influence function on the digits problem.

Three measurements, one command each (``python -m paper cleansing --help``), all on
scikit-learn's digits: pretrain on digits 0-3, finetune a new head on digits 4-9 with the
embedding ``Linear(64, hidden) + Tanh`` kept fixed (Case 1), see
:func:`skmsif.datasets.load_digits_split` and :func:`paper.models.make_digits_mlp`.

* :func:`faithfulness_comparison`: how well each method's predicted change of the summed
  finetune test loss matches the leave-one-out ground truth of
  :func:`skmsif.validation.leave_one_out` (the same retrained changes for both), and what
  each costs.
* :func:`cleansing_experiment`: data cleansing moved to pretraining (Kobayashi et al.,
  Table 2): score the pretrain examples by their summed influence on a validation split
  of the finetune task, remove the most harmful ``fraction``, retrain both stages, and
  compare finetune test accuracy and loss with no removal and a random removal.
* :func:`accuracy_cost`: what training through turn-over masks costs in accuracy
  (Kobayashi et al., Sec. 4.1).

Every stage is trained to convergence with full-batch L-BFGS on a deterministic objective
(turn-over masks are fixed per example, so even the turn-over objective is
deterministic); the only randomness is the data split and the initialisation, both drawn
from the seed. Sign convention: ``doc/guide/influence.md``; a method's "predicted change"
is ``-scores / m`` for both estimators.

Each function returns its numbers; the command line (:func:`main`, not part of the Python
API) runs them, prints Markdown tables, and can save the figures and a JSON of the
numbers. Run from the repository root::

    python -m paper cleansing --size full --out-dir doc/figures
    python -m paper cleansing --size tiny --seeds 1 --n-jobs 1  # a smoke run
"""

import argparse
import json
import time

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state

from skmsif import MultiStageInfluenceEstimator, datasets
from skmsif.turnover import TurnOverDropoutEstimator, train_turnover, turnover_mask
from skmsif.validation import audit_indices, faithfulness, leave_one_out

from .models import MASK_SEED, make_digits_mlp, make_turnover_mlp
from .training import accuracy, fit_lbfgs, total_loss

# ``main`` is the command-line entry point (``python -m paper cleansing``), not part of
# the Python API; it stays importable.
__all__ = ["SIZES", "faithfulness_comparison", "cleansing_experiment", "accuracy_cost"]

PRETRAIN_DAMPING = 1e-2  # L2 weight of pretraining == the estimator's pretrain damping
FINETUNE_DAMPING = 1e-3  # L2 weight of the finetune head == the finetune damping

# "tiny" is a smoke run (seconds; used by the tests); "full" is what doc/guide/turnover.md
# reports (minutes on 2 CPU cores).
SIZES = {
    "tiny": {"hidden": 8, "n_pretrain": 120, "n_finetune": 90, "n_test": 90,
             "n_top": 6, "n_random": 6, "n_seeds": 2, "max_iter": 300,
             "accuracy_hidden": (8,), "own_model_loo": False},
    "full": {"hidden": 16, "n_pretrain": None, "n_finetune": None, "n_test": None,
             "n_top": 50, "n_random": 50, "n_seeds": 8, "max_iter": 2000,
             "accuracy_hidden": (16, 64), "own_model_loo": True},
}


# --------------------------------------------------------------------------- building blocks


def _tensors(pair):
    return (torch.as_tensor(np.asarray(pair[0]), dtype=torch.float64),
            torch.as_tensor(np.asarray(pair[1]), dtype=torch.long))


def _data(seed, size, validation=False):
    """Digits split of one seed; with ``validation``, a third of the finetune test
    digits becomes a validation split (stratified)."""
    cfg = SIZES[size]
    data = datasets.load_digits_split(seed, n_pretrain=cfg["n_pretrain"],
                                      n_finetune=cfg["n_finetune"], n_test=cfg["n_test"])
    if validation:
        inputs, targets = data.x_test
        test_pos, val_pos = train_test_split(np.arange(len(targets)), test_size=1 / 3,
                                             stratify=targets, random_state=seed)
        data.x_val = (inputs[val_pos], targets[val_pos])
        data.x_test = (inputs[test_pos], targets[test_pos])
    return data


def _train_plain(Z, X, hidden, seed, max_iter):
    """Pretrain embedding + head on ``Z``, then only a new head on ``X`` (Case 1)."""
    _, pretrain_model, finetune_model = make_digits_mlp(hidden, seed=seed)
    fit_lbfgs(pretrain_model, Z, damping=PRETRAIN_DAMPING, max_iter=max_iter)
    fit_lbfgs(finetune_model, X, params=list(finetune_model[1].parameters()),
                       damping=FINETUNE_DAMPING, max_iter=max_iter)
    return pretrain_model, finetune_model


def _train_turnover(Z, X, hidden, seed, max_iter, masked_finetune=False):
    """Pretrain through turn-over masks (ids ``0..m-1``); finetune the head on the full
    embedding, or through masks of ids ``m..m+n-1`` with ``masked_finetune``."""
    _, pretrain_model, finetune_model = make_turnover_mlp(hidden, seed=seed)
    train_turnover(pretrain_model, _tensors(Z), weight_decay=PRETRAIN_DAMPING,
                   max_iter=max_iter)
    head = list(finetune_model[1].parameters())
    if masked_finetune:
        m, n = len(Z[1]), len(X[1])
        train_turnover(finetune_model, _tensors(X), params=head, ids=np.arange(m, m + n),
                       weight_decay=FINETUNE_DAMPING, max_iter=max_iter)
    else:
        fit_lbfgs(finetune_model, X, params=head, damping=FINETUNE_DAMPING,
                           max_iter=max_iter)
    for parameter in pretrain_model.parameters():
        parameter.requires_grad_(True)
    return pretrain_model, finetune_model


def _msif_scores(pretrain_model, finetune_model, Z, X, x_eval):
    estimator = MultiStageInfluenceEstimator(hessian="exact",
                                             pretrain_damping=PRETRAIN_DAMPING,
                                             finetune_damping=FINETUNE_DAMPING)
    return estimator.fit(pretrain_model, finetune_model, Z, X).score(x_eval)


def _turnover_scores(pretrain_model, finetune_model, Z, x_eval):
    estimator = TurnOverDropoutEstimator()
    return estimator.fit(pretrain_model, _tensors(Z), finetune_model=finetune_model).score(
        _tensors(x_eval))


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _mask_r2(delta, m, hidden):
    """Fraction of the variance of turn-over's ``delta`` explained linearly by the mask
    bits alone (which hidden units each example owns), i.e. not by the example."""
    bits = (turnover_mask(np.arange(m), hidden, seed=MASK_SEED) > 0).double().numpy()
    design = np.c_[np.ones(m), 2 * bits - 1]
    residual = delta - design @ np.linalg.lstsq(design, delta, rcond=None)[0]
    return float(1 - residual.var() / delta.var())


# --------------------------------------------------------------------------- item 3


def faithfulness_comparison(size="full", random_state=0, n_jobs=2, verbose=0):
    """Rows of the faithfulness table: both estimators against the same leave-one-out.

    One seed of the digits problem. The multi-stage influence function scores the plain
    model (trained without masks); turn-over dropout needs its own model, pretrained
    through turn-over masks on the embedding (the finetune head is trained on the full
    embedding). The pretrain examples audited are the ``n_top`` of largest ``|I|`` under
    the multi-stage influence function plus ``n_random`` at random
    (:func:`skmsif.validation.audit_indices`); each is removed and both stages of the
    plain model retrained to convergence (:func:`skmsif.validation.leave_one_out`).
    Both methods' predicted changes (``-scores / m``) are compared with those retrained
    changes. With ``own_model_loo`` (size ``"full"``) turn-over is also compared with
    leave-one-out retraining of its *own* (turn-over) model, on its own top and random
    examples, which is the most favourable ground truth it can get.

    Parameters
    ----------
    size : {"tiny", "full"}, default="full"
        See :data:`SIZES`.
    random_state : int, default=0
        Seeds the data split, the initialisation and the random audit.
    n_jobs : int, default=2
        Parallel leave-one-out retrains.
    verbose : int, default=0
        Verbosity of the leave-one-out retrains (progress bar when positive).

    Returns
    -------
    result : sklearn.utils.Bunch
        ``rows``: list of dicts (``method``, ``pearson``/``spearman`` on ``all``,
        ``top`` and ``random``, ``slope``, ``fit_s`` and ``score_s`` (estimation
        wall-clock), ``train_s`` (training both stages), ``ground_truth``);
        ``predicted`` and ``actual`` arrays for plotting; ``mask_r2``; ``m``;
        ``loo_s``, the wall-clock of the leave-one-out retrains.

    See Also
    --------
    skmsif.validation.leave_one_out : The retrained ground truth.
    skmsif.validation.faithfulness : The correlations of each row.

    Examples
    --------
    >>> from paper.cleansing import faithfulness_comparison
    >>> result = faithfulness_comparison(size="tiny", random_state=0, n_jobs=1)
    >>> [row["method"] for row in result.rows]
    ['multi-stage influence (exact)', 'turn-over dropout']
    >>> result.m, result.actual.shape
    (120, (12,))
    >>> bool(result.rows[0]["pearson_all"] > 0.5)
    True
    """
    cfg = SIZES[size]
    seed = int(random_state)
    data = _data(seed, size)
    Z, X, x_test = data.Z, data.X, data.x_test
    m = len(Z[1])
    hidden, max_iter = cfg["hidden"], cfg["max_iter"]

    (pretrain_plain, finetune_plain), plain_train_s = _timed(
        _train_plain, Z, X, hidden, seed, max_iter)
    estimator = MultiStageInfluenceEstimator(hessian="exact",
                                             pretrain_damping=PRETRAIN_DAMPING,
                                             finetune_damping=FINETUNE_DAMPING)
    _, msif_fit_s = _timed(estimator.fit, pretrain_plain, finetune_plain, Z, X)
    msif_scores, msif_score_s = _timed(estimator.score, x_test)

    (pretrain_turn, finetune_turn), turn_train_s = _timed(
        _train_turnover, Z, X, hidden, seed, max_iter)
    turnover = TurnOverDropoutEstimator()
    _, turn_fit_s = _timed(turnover.fit, pretrain_turn, _tensors(Z), finetune_turn)
    turn_scores, turn_score_s = _timed(turnover.score, _tensors(x_test))

    audit = audit_indices(msif_scores, n_top=cfg["n_top"], n_random=cfg["n_random"],
                          random_state=seed)
    start = time.perf_counter()
    actual = leave_one_out(pretrain_plain, finetune_plain, Z, X, x_test, audit.indices,
                           pretrain_damping=PRETRAIN_DAMPING,
                           finetune_damping=FINETUNE_DAMPING, max_iter=max_iter,
                           n_jobs=n_jobs, verbose=verbose)
    loo_s = time.perf_counter() - start

    def row(method, scores, train_s, fit_s, score_s, indices, truth, groups, ground):
        metrics = faithfulness(-scores[indices] / m, truth, groups=groups)
        return {"method": method, "ground_truth": ground,
                **{f"{key}_{group}": metrics[group][key] for group in metrics
                   for key in ("pearson", "spearman")},
                "slope": metrics["all"]["slope"], "train_s": train_s, "fit_s": fit_s,
                "score_s": score_s}

    plain_truth = "leave-one-out of the plain model"
    rows = [
        row("multi-stage influence (exact)", msif_scores, plain_train_s, msif_fit_s,
            msif_score_s, audit.indices, actual, audit.groups, plain_truth),
        row("turn-over dropout", turn_scores, turn_train_s, turn_fit_s, turn_score_s,
            audit.indices, actual, audit.groups, plain_truth),
    ]
    delta = -turn_scores / m
    result = Bunch(rows=rows, m=m, loo_s=loo_s, mask_r2=_mask_r2(delta, m, hidden),
                   predicted={"multi-stage influence (exact)": -msif_scores[audit.indices] / m,
                              "turn-over dropout": delta[audit.indices]},
                   actual=actual, indices=audit.indices, groups=audit.groups)

    if cfg["own_model_loo"]:
        Z_full = _tensors(Z)

        def pretrain_fn(model, Z_kept):
            """Retrain the turn-over model on Z without one example, keeping the ids."""
            inputs = Z_kept[0].cpu()
            ids = np.arange(m)
            if len(inputs) < m:
                differs = (inputs != Z_full[0][:len(inputs)].to(inputs.dtype)).any(1)
                removed = int(differs.nonzero()[0]) if differs.any() else m - 1
                ids = np.delete(ids, removed)
            train_turnover(model, Z_kept, ids=ids, weight_decay=PRETRAIN_DAMPING,
                           max_iter=max_iter)

        own_audit = audit_indices(turn_scores, n_top=cfg["n_top"] // 2,
                                  n_random=cfg["n_random"] // 2, random_state=seed)
        own_actual = leave_one_out(pretrain_turn, finetune_turn, Z, X, x_test,
                                   own_audit.indices, pretrain_fn=pretrain_fn,
                                   finetune_damping=FINETUNE_DAMPING, max_iter=max_iter,
                                   n_jobs=n_jobs, verbose=verbose)
        rows.append(row("turn-over dropout", turn_scores, turn_train_s, turn_fit_s,
                        turn_score_s, own_audit.indices, own_actual, own_audit.groups,
                        "leave-one-out of the turn-over model itself"))
        result.own_actual = own_actual
        result.own_predicted = delta[own_audit.indices]
    return result


# --------------------------------------------------------------------------- item 4


def cleansing_experiment(size="full", seeds=None, fraction=0.01):
    """Remove the most harmful pretrain examples, retrain both stages, test the result.

    For each seed: split the digits (finetune test digits split 2:1 into test and
    validation), train the plain model, and score every pretrain example by its summed
    influence on the validation split with (a) the multi-stage influence function (on
    the plain model) and (b) turn-over dropout (on a model pretrained through turn-over
    masks). Remove the ``ceil(fraction * m)`` most harmful (largest scores), or as many
    at random, and retrain both stages of the plain model from the same initialisation
    (no turn-over dropout, as in the paper). Report finetune test accuracy and summed
    cross-entropy per test digit.

    Parameters
    ----------
    size : {"tiny", "full"}, default="full"
        See :data:`SIZES`.
    seeds : sequence of int, default=None
        Seeds of the data split and the initialisation, one run each;
        ``None``: ``range(SIZES[size]["n_seeds"])``.
    fraction : float, default=0.01
        Fraction of the pretrain examples removed.

    Returns
    -------
    result : sklearn.utils.Bunch
        ``per_seed``: dict of method to arrays ``accuracy`` and ``loss`` (one per seed);
        ``summary``: method to ``(mean, std)`` of accuracy and loss, and of the paired
        difference to no removal; ``n_removed``; ``seeds``; ``elapsed_s``.

    Examples
    --------
    >>> from paper.cleansing import cleansing_experiment
    >>> result = cleansing_experiment(size="tiny", seeds=[0])
    >>> list(result.summary)
    ['no removal', 'random removal', 'multi-stage influence', 'turn-over dropout']
    >>> result.n_removed, result.seeds
    (2, [0])
    >>> result.per_seed["turn-over dropout"]["accuracy"].shape
    (1,)
    >>> result.summary["no removal"]["accuracy_change"]
    (0.0, 0.0)
    """
    cfg = SIZES[size]
    seeds = list(range(cfg["n_seeds"])) if seeds is None else [int(s) for s in seeds]
    methods = ("no removal", "random removal", "multi-stage influence",
               "turn-over dropout")
    per_seed = {method: {"accuracy": [], "loss": []} for method in methods}
    start = time.perf_counter()
    n_removed = None
    for seed in seeds:
        data = _data(seed, size, validation=True)
        Z, X, x_val, x_test = data.Z, data.X, data.x_val, data.x_test
        m = len(Z[1])
        n_removed = int(np.ceil(fraction * m))
        pretrain_model, finetune_model = _train_plain(Z, X, cfg["hidden"], seed,
                                                      cfg["max_iter"])
        msif = _msif_scores(pretrain_model, finetune_model, Z, X, x_val)
        turn_models = _train_turnover(Z, X, cfg["hidden"], seed, cfg["max_iter"])
        turn = _turnover_scores(*turn_models, Z, x_val)
        rng = check_random_state(seed)
        removals = {
            "no removal": np.array([], dtype=np.int64),
            "random removal": rng.choice(m, n_removed, replace=False),
            "multi-stage influence": np.argsort(-msif, kind="stable")[:n_removed],
            "turn-over dropout": np.argsort(-turn, kind="stable")[:n_removed],
        }
        for method, removed in removals.items():
            if method == "no removal":
                model = finetune_model
            else:
                keep = np.setdiff1d(np.arange(m), removed)
                _, model = _train_plain((Z[0][keep], Z[1][keep]), X, cfg["hidden"], seed,
                                        cfg["max_iter"])
            per_seed[method]["accuracy"].append(accuracy(model, x_test))
            per_seed[method]["loss"].append(
                total_loss(model, x_test) / len(x_test[1]))
    summary = {}
    for method in methods:
        values = {key: np.asarray(v) for key, v in per_seed[method].items()}
        per_seed[method] = values
        summary[method] = {}
        for key in ("accuracy", "loss"):
            diff = values[key] - np.asarray(per_seed["no removal"][key])
            summary[method][key] = (float(values[key].mean()), float(values[key].std()))
            summary[method][f"{key}_change"] = (float(diff.mean()), float(diff.std()))
    return Bunch(per_seed=per_seed, summary=summary, n_removed=n_removed, seeds=seeds,
                 elapsed_s=time.perf_counter() - start)


# --------------------------------------------------------------------------- item 5


def accuracy_cost(size="full", seeds=None):
    """Test accuracy and loss with and without turn-over masks during training.

    Per seed and width ``hidden``:

    * single stage: a classifier of digits 0-3 (half of them held out, stratified),
      trained plain or through turn-over masks on the hidden layer;
    * multi-stage: the finetune test accuracy (digits 4-9) of the plain model, of the
      turn-over-pretrained embedding with the head finetuned on the full embedding, and
      with the head finetuned through turn-over masks.

    Turn-over models are evaluated as the full network (no mask), as dropout is at test
    time.

    Parameters
    ----------
    size : {"tiny", "full"}, default="full"
        See :data:`SIZES`; its ``accuracy_hidden`` gives the widths ``hidden``.
    seeds : sequence of int, default=None
        Seeds of the data split and the initialisation, one run each;
        ``None``: ``range(SIZES[size]["n_seeds"])``.

    Returns
    -------
    result : sklearn.utils.Bunch
        ``rows``: list of dicts of ``setting``, ``hidden``, ``model``, and
        ``accuracy``/``loss`` as ``(mean, std)`` over seeds; ``seeds``; ``elapsed_s``.

    Examples
    --------
    >>> from paper.cleansing import accuracy_cost
    >>> result = accuracy_cost(size="tiny", seeds=[0])
    >>> for row in result.rows:
    ...     print(row["hidden"], row["model"])
    8 plain
    8 turn-over
    8 plain
    8 turn-over, head on full embedding
    8 turn-over, head through masks
    >>> bool(min(row["accuracy"][0] for row in result.rows[:2]) > 0.8)
    True
    """
    cfg = SIZES[size]
    seeds = list(range(cfg["n_seeds"])) if seeds is None else [int(s) for s in seeds]
    start = time.perf_counter()
    results = {}

    def record(key, model, data):
        results.setdefault(key, {"accuracy": [], "loss": []})
        results[key]["accuracy"].append(accuracy(model, data))
        results[key]["loss"].append(total_loss(model, data) / len(data[1]))

    for hidden in cfg["accuracy_hidden"]:
        for seed in seeds:
            data = _data(seed, size)
            Z, X, x_test = data.Z, data.X, data.x_test
            train_pos, test_pos = train_test_split(np.arange(len(Z[1])), test_size=0.5,
                                                   stratify=Z[1], random_state=seed)
            Z_train = (Z[0][train_pos], Z[1][train_pos])
            Z_test = (Z[0][test_pos], Z[1][test_pos])
            _, pretrain_model, _ = make_digits_mlp(hidden, seed=seed)
            fit_lbfgs(pretrain_model, Z_train, damping=PRETRAIN_DAMPING,
                               max_iter=cfg["max_iter"])
            record(("single stage (digits 0-3)", hidden, "plain"), pretrain_model, Z_test)
            _, pretrain_model, _ = make_turnover_mlp(hidden, seed=seed)
            train_turnover(pretrain_model, _tensors(Z_train), weight_decay=PRETRAIN_DAMPING,
                           max_iter=cfg["max_iter"])
            record(("single stage (digits 0-3)", hidden, "turn-over"), pretrain_model,
                   Z_test)

            setting = "multi-stage (finetune digits 4-9)"
            _, finetune_model = _train_plain(Z, X, hidden, seed, cfg["max_iter"])
            record((setting, hidden, "plain"), finetune_model, x_test)
            for masked, name in ((False, "turn-over, head on full embedding"),
                                 (True, "turn-over, head through masks")):
                _, finetune_model = _train_turnover(Z, X, hidden, seed, cfg["max_iter"],
                                                    masked_finetune=masked)
                record((setting, hidden, name), finetune_model, x_test)
    rows = [{"setting": setting, "hidden": hidden, "model": model,
             **{key: (float(np.mean(v)), float(np.std(v))) for key, v in values.items()}}
            for (setting, hidden, model), values in results.items()]
    return Bunch(rows=rows, seeds=seeds, elapsed_s=time.perf_counter() - start)


# --------------------------------------------------------------------------- reporting


def _pm(pair, digits=3, scale=1.0):
    return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"


def _faithfulness_markdown(result):
    lines = ["| method | ground truth | Pearson all / top / random | Spearman all / top / "
             "random | slope | train both stages (s) | estimate (fit + score, s) |",
             "|---|---|---|---|---|---|---|"]
    for row in result.rows:
        lines.append(
            f"| {row['method']} | {row['ground_truth']} | "
            f"{row['pearson_all']:.3f} / {row['pearson_top']:.3f} / "
            f"{row['pearson_random']:.3f} | {row['spearman_all']:.3f} / "
            f"{row['spearman_top']:.3f} / {row['spearman_random']:.3f} | "
            f"{row['slope']:.3g} | {row['train_s']:.1f} | "
            f"{row['fit_s'] + row['score_s']:.2f} |")
    lines.append(f"\nm = {result.m} pretrain examples; leave-one-out retrains took "
                 f"{result.loo_s:.0f} s; the mask bits alone explain "
                 f"{100 * result.mask_r2:.0f}% of the variance of turn-over's delta.")
    return "\n".join(lines)


def _cleansing_markdown(result):
    lines = [f"Removed {result.n_removed} pretrain examples; seeds {result.seeds}; "
             "mean ± std over seeds.\n",
             "| removal | test accuracy (%) | test loss | accuracy change vs none (points) "
             "| loss change vs none |", "|---|---|---|---|---|"]
    for method, values in result.summary.items():
        lines.append(f"| {method} | {_pm(values['accuracy'], 1, 100)} | "
                     f"{_pm(values['loss'], 4)} | {_pm(values['accuracy_change'], 2, 100)} "
                     f"| {_pm(values['loss_change'], 4)} |")
    return "\n".join(lines)


def _accuracy_markdown(result):
    lines = [f"Seeds {result.seeds}; mean ± std over seeds.\n",
             "| setting | hidden | model | test accuracy (%) | test loss |",
             "|---|---|---|---|---|"]
    for row in result.rows:
        lines.append(f"| {row['setting']} | {row['hidden']} | {row['model']} | "
                     f"{_pm(row['accuracy'], 1, 100)} | {_pm(row['loss'], 3)} |")
    return "\n".join(lines)


def _plot(out_dir, faith=None, cleansing=None, cost=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if faith is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
        for ax, (method, predicted) in zip(axes, faith.predicted.items()):
            for group, color in (("top", "tab:red"), ("random", "tab:blue")):
                sel = faith.groups[group]
                ax.scatter(faith.actual[sel], predicted[sel], s=12, color=color,
                           label=group)
            ax.axhline(0, color="gray", lw=0.5)
            ax.axvline(0, color="gray", lw=0.5)
            ax.set_xlabel("leave-one-out change of the summed test loss")
            ax.set_ylabel("predicted change")
            ax.set_title(method)
            ax.legend()
        path = f"{out_dir}/turnover_faithfulness.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    if cleansing is not None:
        methods = list(cleansing.summary)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
        for ax, key, label in ((axes[0], "accuracy", "test accuracy"),
                               (axes[1], "loss", "test loss (mean cross-entropy)")):
            means = [cleansing.summary[method][key][0] for method in methods]
            stds = [cleansing.summary[method][key][1] for method in methods]
            ax.bar(range(len(methods)), means, yerr=stds, capsize=4,
                   color=["gray", "tab:blue", "tab:green", "tab:orange"])
            ax.set_xticks(range(len(methods)), [m.replace(" ", "\n", 1) for m in methods],
                          fontsize=8)
            low = min(mu - sd for mu, sd in zip(means, stds))
            high = max(mu + sd for mu, sd in zip(means, stds))
            ax.set_ylim(low - 0.5 * (high - low), high + 0.2 * (high - low))
            ax.set_title(label)
        fig.suptitle(f"Pretrain data cleansing: {cleansing.n_removed} examples removed, "
                     f"{len(cleansing.seeds)} seeds")
        path = f"{out_dir}/turnover_cleansing.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    if cost is not None:
        fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")
        labels = [f"{r['setting'].split(' (')[0]}\nh={r['hidden']}\n{r['model']}"
                  for r in cost.rows]
        ax.bar(range(len(cost.rows)), [r["accuracy"][0] for r in cost.rows],
               yerr=[r["accuracy"][1] for r in cost.rows], capsize=3)
        ax.set_xticks(range(len(cost.rows)), labels, fontsize=6)
        ax.set_ylabel("test accuracy")
        ax.set_title("Accuracy with and without turn-over dropout")
        path = f"{out_dir}/turnover_accuracy.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close("all")
    return written


def main(argv=None):
    """Run the experiments from the command line and print their tables.

    The entry point of ``python -m paper cleansing`` (for example
    ``python -m paper cleansing --size full --out-dir doc/figures``); ``--help`` lists
    the options. Not part of the Python API: call :func:`faithfulness_comparison`,
    :func:`cleansing_experiment` and :func:`accuracy_cost` instead.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    report : dict
        The numbers of each experiment run, keyed by ``"faithfulness"``,
        ``"cleansing"`` and ``"accuracy"`` (what ``--json`` writes).
    """
    parser = argparse.ArgumentParser(
        prog="python -m paper cleansing",
        description="Turn-over dropout vs the multi-stage influence function on digits.")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--experiment", choices=["all", "faithfulness", "cleansing",
                                                 "accuracy"], default="all")
    parser.add_argument("--fraction", type=float, default=0.01,
                        help="fraction of pretrain examples removed by cleansing")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default: 8 for full, 2 for tiny)")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="write turnover_*.png here")
    parser.add_argument("--json", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = None if args.seeds is None else list(range(args.seeds))
    faith = cleansing = cost = None
    report = {}
    if args.experiment in ("all", "faithfulness"):
        faith = faithfulness_comparison(args.size, n_jobs=args.n_jobs)
        print("## Faithfulness against leave-one-out (seed 0)\n")
        print(_faithfulness_markdown(faith) + "\n")
        report["faithfulness"] = {"rows": faith.rows, "m": faith.m, "loo_s": faith.loo_s,
                                  "mask_r2": faith.mask_r2}
    if args.experiment in ("all", "cleansing"):
        cleansing = cleansing_experiment(args.size, seeds, args.fraction)
        print("## Pretrain data cleansing\n")
        print(_cleansing_markdown(cleansing) + f"\n\n({cleansing.elapsed_s:.0f} s)\n")
        report["cleansing"] = {"summary": cleansing.summary,
                               "n_removed": cleansing.n_removed, "seeds": cleansing.seeds,
                               "per_seed": {k: {kk: vv.tolist() for kk, vv in v.items()}
                                            for k, v in cleansing.per_seed.items()}}
    if args.experiment in ("all", "accuracy"):
        cost = accuracy_cost(args.size, seeds)
        print("## Accuracy cost of training with turn-over dropout\n")
        print(_accuracy_markdown(cost) + f"\n\n({cost.elapsed_s:.0f} s)\n")
        report["accuracy"] = {"rows": cost.rows, "seeds": cost.seeds}
    if args.out_dir:
        for path in _plot(args.out_dir, faith, cleansing, cost):
            print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1, default=float)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
