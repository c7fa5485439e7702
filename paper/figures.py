"""The paper's experiments (Chen et al., Sec. 4, Figs. 2-7), each saving a PNG and a JSON.

Every ``figN(dataset, size, out, ...)`` returns a dict of the numbers it measured (also
written to ``out/figN-<dataset>-<size>.json``) and saves ``out/figN-<dataset>-<size>.png``.
The entry point is :func:`run`, which takes the name and describes every figure; the
command line is ``python -m paper <figure> ...`` from the repository root.
"""

import json
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from skmsif import MultiStageInfluenceEstimator, datasets  # noqa: E402
from skmsif.baselines import (  # noqa: E402
    IdentityHessianBaseline,
    PretrainLossBaseline,
    RandomBaseline,
)
from skmsif.validation import audit_indices, faithfulness, leave_one_out  # noqa: E402

from . import problems  # noqa: E402
from .problems import CONFIGS, DATASETS, SIZES  # noqa: E402, F401
from .training import accuracy, per_example_loss  # noqa: E402

__all__ = ["run", "FIGURES", "CONFIGS", "DATASETS", "SIZES"]

METHODS = ("multi-stage", "identity", "pretrain loss", "random")
# What the paper reports (Figs. 2b, 4, 5; Sec. 4.2-4.3), for the JSON and the plots.
PAPER = {
    "fig2": {"pearson": 0.6, "what": "MNIST, Case 1, top-100 by |I|"},
    "fig4": {"pearson": 0.17, "what": "MNIST, identity Hessians"},
    "fig5": {"pearson": 0.40, "what": "CIFAR, Case 2"},
    "fig6": {"mean_abs_same_task": 0.055, "mean_abs_other_task": 0.025, "what": "CIFAR"},
    "fig7": {"mean_abs_small": 0.22, "mean_abs_large": 0.15, "what": "CIFAR, Case 2"},
}


# --------------------------------------------------------------------------- helpers


def _paths(out, name, dataset, size):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{dataset}-{size}"
    return out / f"{stem}.png", out / f"{stem}.json"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def _save(result, png, js, fig):
    fig.savefig(png, dpi=80)
    plt.close(fig)
    result["png"] = str(png)
    result["json"] = str(js)
    with open(js, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(result), handle, indent=1)
    return result


class _Recorder:
    """Collects the ConvergenceWarnings of the estimator's solves, to report in the JSON."""

    def __init__(self):
        self.messages = []

    def __call__(self, fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            result = fn(*args, **kwargs)
        for warning in caught:
            if issubclass(warning.category, ConvergenceWarning):
                self.messages.append(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        return result


def _scores(prob, recorder):
    """Scores of the estimator and of each baseline, with the seconds each took."""
    args = (prob.pretrain_model, prob.finetune_model, prob.Z, prob.X)
    timings = {}
    start = time.perf_counter()
    estimator = MultiStageInfluenceEstimator(**prob.estimator_params)
    recorder(estimator.fit, *args)
    scores = {"multi-stage": recorder(estimator.score, prob.x_test)}
    timings["multi-stage"] = time.perf_counter() - start
    identity_params = {k: v for k, v in prob.estimator_params.items()
                       if k in IdentityHessianBaseline().get_params()}
    baselines = {"identity": IdentityHessianBaseline(**identity_params),
                 "pretrain loss": PretrainLossBaseline(),
                 "random": RandomBaseline(random_state=0)}
    for name, baseline in baselines.items():
        start = time.perf_counter()
        scores[name] = baseline.fit(*args).score(prob.x_test)
        timings[name] = time.perf_counter() - start
    return estimator, scores, timings


def _ground_truth(prob, indices, out, verbose):
    start = time.perf_counter()
    change, info = leave_one_out(
        prob.pretrain_model, prob.finetune_model, prob.Z, prob.X, prob.x_test, indices,
        return_info=True, cache=Path(out) / "cache" / "loo", verbose=verbose,
        **prob.loo_params)
    return change, info, time.perf_counter() - start


def _scatter(ax, predicted, actual, groups, title):
    for group, colour in (("random", "tab:gray"), ("top", "tab:red")):
        sel = groups[group]
        ax.scatter(actual[sel], predicted[sel], s=14, c=colour, label=f"{group}-{len(sel)}")
    lo = min(actual.min(), predicted.min())
    hi = max(actual.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8, label="y = x")
    ax.set_xlabel("actual change of test loss (leave-one-out)")
    ax.set_ylabel("predicted change  -I(z)/m")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))


def _bars(ax, metrics, paper_pearson=None):
    width = 0.25
    positions = np.arange(len(METHODS))
    for k, group in enumerate(("all", "top", "random")):
        values = [metrics[m][group]["pearson"] for m in METHODS]
        values = [0.0 if v is None or not np.isfinite(v) else v for v in values]
        ax.bar(positions + (k - 1) * width, values, width, label=group)
    if paper_pearson is not None:
        ax.axhline(paper_pearson, color="k", ls="--", lw=0.8, label="paper")
    ax.set_xticks(positions, METHODS, fontsize=8)
    ax.set_ylabel("Pearson r with leave-one-out")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=2)


# --------------------------------------------------------------------------- Figs. 2, 4, 5


def correlation(name, dataset, size, out, case, highlight="multi-stage", n_jobs=None,
                verbose=0):
    """Predicted vs leave-one-out changes for an audit set; estimator and baselines."""
    png, js = _paths(out, name, dataset, size)
    started = time.perf_counter()
    prob = problems.problem(dataset, size, case, cache_dir=Path(out) / "cache", n_jobs=n_jobs)
    cfg = prob.config
    recorder = _Recorder()
    estimator, scores, timings = _scores(prob, recorder)
    m = len(scores["multi-stage"])
    audit = audit_indices(scores["multi-stage"], n_top=cfg["n_top"], n_random=cfg["n_random"],
                          random_state=0)
    change, info, loo_seconds = _ground_truth(prob, audit.indices, out, verbose)
    metrics = {method: faithfulness(-scores[method][audit.indices] / m, change,
                                    groups=audit.groups) for method in METHODS}
    result = {
        "figure": name, "dataset": dataset, "size": size, "case": case,
        "highlight": highlight, "m": m, "n_finetune": len(prob.X[1]),
        "n_test": len(prob.x_test[1]), "config": cfg, "training": prob.training,
        "estimator": {"params": prob.estimator_params, "hessian": estimator.hessian_,
                      "n_params": estimator.n_params_,
                      "solver_warnings": recorder.messages},
        "leave_one_out": {"params": {k: v for k, v in prob.loo_params.items()},
                          "seconds": loo_seconds, "n_retrains": len(audit.indices) + 1,
                          "from_cache": int(info.from_cache.sum()),
                          "converged": bool(info.converged.all()),
                          "retrain_converged": info.converged,
                          "pretrain_distance": info.pretrain_distance,
                          "finetune_distance": info.finetune_distance,
                          "finetune_n_iter": info.finetune_n_iter},
        "seconds": {"scores": timings}, "metrics": metrics,
        "audit": {"indices": audit.indices, "groups": audit.groups,
                  "predicted": -scores[highlight][audit.indices] / m, "actual": change},
        "paper": PAPER.get(name),
    }
    result["seconds"]["total"] = time.perf_counter() - started

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    chosen = metrics[highlight]
    _scatter(axes[0], -scores[highlight][audit.indices] / m, change, audit.groups,
             f"{highlight} ({'Case 1' if case == 'fixed' else 'Case 2'}, {dataset}): Pearson "
             f"all {chosen['all']['pearson']:.3f}, top {chosen['top']['pearson']:.3f}, "
             f"random {chosen['random']['pearson']:.3f}")
    _bars(axes[1], metrics, (PAPER.get(name) or {}).get("pearson"))
    axes[1].set_title(f"same {len(audit.indices)} removals, every scorer", fontsize=9)
    return _save(result, png, js, fig)


def fig2(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Case 1 (embedding fixed): multi-stage influence vs leave-one-out (paper Fig. 2)."""
    return correlation("fig2", dataset, size, out, "fixed", n_jobs=n_jobs, verbose=verbose)


def fig4(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Case 1 with identity Hessians vs leave-one-out (paper Fig. 4); same removals as
    Fig. 2 (the retrains are cached in ``out/cache``)."""
    return correlation("fig4", dataset, size, out, "fixed", highlight="identity",
                       n_jobs=n_jobs, verbose=verbose)


def fig5(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Case 2 (embedding updated, alpha proximity): influence vs leave-one-out (Fig. 5)."""
    return correlation("fig5", dataset, size, out, "updated", n_jobs=n_jobs, verbose=verbose)


# --------------------------------------------------------------------------- Fig. 3


def _show(ax, image, shape, title, colour):
    ax.imshow(np.asarray(image).reshape(shape), cmap="gray_r")
    ax.set_title(title, fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)


def fig3(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Most harmful pretrain examples for misclassified finetune test examples (Fig. 3).

    Besides the images, measures whether the harmful examples are "low quality" as the
    paper says: their pretrain loss and how often the pretrained model misclassifies
    them, against the pretrain set as a whole.
    """
    png, js = _paths(out, "fig3", dataset, size)
    prob = problems.problem(dataset, size, "fixed", cache_dir=Path(out) / "cache")
    cfg, data = prob.config, prob.data
    recorder = _Recorder()
    losses = per_example_loss(prob.finetune_model, prob.x_test)
    predicted = _predict(prob.finetune_model, prob.x_test)
    wrong = np.flatnonzero(predicted != prob.x_test[1])
    chosen = wrong[np.argsort(-losses[wrong], kind="stable")][:cfg["n_explained"]]
    estimator = MultiStageInfluenceEstimator(**prob.estimator_params)
    recorder(estimator.fit, prob.pretrain_model, prob.finetune_model, prob.Z, prob.X)
    influence = recorder(estimator.influence,
                         (prob.x_test[0][chosen], prob.x_test[1][chosen]))
    pretrain_losses = per_example_loss(prob.pretrain_model, prob.Z)
    pretrain_wrong = _predict(prob.pretrain_model, prob.Z) != prob.Z[1]
    k = cfg["n_shown"]
    rows = []
    harmful_all = []
    for row, t in enumerate(chosen):
        harmful = np.argsort(-influence[row], kind="stable")[:k]
        harmful_all.extend(harmful.tolist())
        rows.append({"test_index": int(t), "label": int(prob.x_test[1][t]),
                     "predicted": int(predicted[t]), "test_loss": float(losses[t]),
                     "harmful": harmful, "harmful_labels": prob.Z[1][harmful],
                     "harmful_influence": influence[row][harmful],
                     "harmful_pretrain_loss": pretrain_losses[harmful]})
    harmful_all = np.array(harmful_all, dtype=int)
    result = {
        "figure": "fig3", "dataset": dataset, "size": size, "m": len(prob.Z[1]),
        "training": prob.training, "estimator_warnings": recorder.messages, "rows": rows,
        "n_misclassified": len(wrong),
        "quality": {
            "harmful_mean_pretrain_loss": float(pretrain_losses[harmful_all].mean())
            if len(harmful_all) else None,
            "all_mean_pretrain_loss": float(pretrain_losses.mean()),
            "harmful_pretrain_error_rate": float(pretrain_wrong[harmful_all].mean())
            if len(harmful_all) else None,
            "all_pretrain_error_rate": float(pretrain_wrong.mean()),
        },
    }
    shape = data.image_shape
    names = getattr(data, "class_names", None)

    def label_name(label, classes):
        original = classes[int(label)]
        return names[original] if names is not None else str(original)

    n_rows = max(1, len(chosen))
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(1.4 * (k + 1), 1.6 * n_rows + 0.4),
                             squeeze=False, layout="constrained")
    for row, entry in enumerate(rows):
        t = entry["test_index"]
        _show(axes[row, 0], prob.x_test[0][t], shape,
              f"test #{t}\ntrue {label_name(entry['label'], data.finetune_classes)}, "
              f"pred {label_name(entry['predicted'], data.finetune_classes)}", "tab:blue")
        for col, i in enumerate(entry["harmful"], start=1):
            _show(axes[row, col], prob.Z[0][i], shape,
                  f"#{i}: {label_name(prob.Z[1][i], data.pretrain_classes)}\n"
                  f"I = {influence[row][i]:+.3g}", "tab:red")
    for row in range(len(rows), n_rows):
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("misclassified finetune test examples (blue) and their most harmful "
                 "pretrain examples (red, I > 0)", fontsize=8)
    return _save(result, png, js, fig)


def _predict(model, data, batch_size=1024):
    import torch

    inputs = torch.as_tensor(np.asarray(data[0])).to(next(model.parameters()).dtype)
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(inputs[s:s + batch_size]).argmax(1).numpy()
                               for s in range(0, len(inputs), batch_size)])


# --------------------------------------------------------------------------- Figs. 6, 7


def _distribution_plot(scores, labels, title):
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    everything = np.concatenate(list(scores))
    bins = np.linspace(everything.min(), everything.max(), 50)
    for values, label in zip(scores, labels):
        ax.hist(values, bins=bins, alpha=0.55,
                label=f"{label}: mean |I| = {np.abs(values).mean():.3g}")
    ax.set_xlabel("I(z) summed over the test set")
    ax.set_ylabel("pretrain examples")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _task_data(dataset, size, cfg, random_state=0):
    """Pretrain data and two finetune tasks: A = the pretrain classes on held-out data,
    B = four other classes; equal finetune and test sizes."""
    n = cfg["task_size"]
    other = (4, 5, 6, 7)
    if dataset == "digits":
        data = datasets.load_digits_split(random_state, finetune_classes=other,
                                          n_pretrain=cfg["n_pretrain"], n_finetune=n,
                                          n_test=n, pretrain_holdout=0.5)
        held_in, held_out = train_test_split(np.arange(len(data.Z_holdout[1])),
                                             train_size=n, test_size=n,
                                             stratify=data.Z_holdout[1],
                                             random_state=random_state)
        task_a = ((data.Z_holdout[0][held_in], data.Z_holdout[1][held_in]),
                  (data.Z_holdout[0][held_out], data.Z_holdout[1][held_out]))
    else:
        n_test = cfg["n_test"] if cfg["n_test"] is not None else 4000
        data = datasets.fashion_mnist_split(random_state, finetune_classes=other,
                                            n_pretrain=cfg["n_pretrain"], n_finetune=n,
                                            n_test=n_test, n_holdout=n)
        task_a = (data.Z_holdout, data.Z_holdout_test)
    task_b = (data.X, data.x_test)
    return data, task_a, task_b


def _influence_of(prob_like, case, cfg, recorder):
    estimator = MultiStageInfluenceEstimator(**problems.estimator_params(cfg, case))
    recorder(estimator.fit, *prob_like[:4])
    return recorder(estimator.score, prob_like[4])


def fig6(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Task similarity (paper Fig. 6): finetuning on the pretrain task itself (A) vs on
    other classes (B), embedding fixed; mean |I| should be larger for A."""
    png, js = _paths(out, "fig6", dataset, size)
    cfg = problems.config(dataset, size)
    data, task_a, task_b = _task_data(dataset, size, cfg)
    embedding, pretrain_model, pretrain_info = problems.pretrain(
        dataset, size, data, cache_dir=Path(out) / "cache")
    recorder = _Recorder()
    scores, tasks = [], {}
    for name, (train, test), classes in (("A", task_a, data.pretrain_classes),
                                         ("B", task_b, data.finetune_classes)):
        model, info = problems.finetune(dataset, size, embedding, pretrain_model, train,
                                      len(classes), "fixed")
        values = _influence_of((pretrain_model, model, data.Z, train, test), "fixed", cfg,
                               recorder)
        scores.append(values)
        tasks[name] = {"classes": classes, "n_finetune": len(train[1]),
                       "n_test": len(test[1]), "training": info,
                       "test_accuracy": accuracy(model, test),
                       "mean_abs": float(np.abs(values).mean()),
                       "median_abs": float(np.median(np.abs(values)))}
    result = {"figure": "fig6", "dataset": dataset, "size": size, "m": len(data.Z[1]),
              "pretrain": pretrain_info, "tasks": tasks,
              "ratio_mean_abs": tasks["A"]["mean_abs"] / tasks["B"]["mean_abs"],
              "estimator_warnings": recorder.messages, "paper": PAPER["fig6"]}
    fig = _distribution_plot(scores, ["A: same task as pretrain", "B: other classes"],
                             f"task similarity ({dataset}, Case 1); paper: 0.055 vs 0.025")
    return _save(result, png, js, fig)


def fig7(dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Finetune size (paper Fig. 7): model D has 3x model C's finetune examples (and 3x
    its training steps under the Adam recipe), embedding updated; mean |I| should drop."""
    png, js = _paths(out, "fig7", dataset, size)
    cfg = problems.config(dataset, size)
    n_small = cfg["small_finetune"]
    data = problems.load(dataset, size, n_finetune=3 * n_small)
    rng = np.random.RandomState(0)
    small = np.sort(rng.choice(3 * n_small, n_small, replace=False))
    finetune_sets = {"C": (data.X[0][small], data.X[1][small]), "D": data.X}
    embedding, pretrain_model, pretrain_info = problems.pretrain(
        dataset, size, data, cache_dir=Path(out) / "cache")
    recorder = _Recorder()
    scores, models = [], {}
    for name, train in finetune_sets.items():
        steps = None
        if cfg["recipe"] == "paper":
            steps = cfg["finetune_steps"] * (3 if name == "D" else 1)
        model, info = problems.finetune(dataset, size, embedding, pretrain_model, train,
                                      len(data.finetune_classes), "updated", n_steps=steps)
        values = _influence_of((pretrain_model, model, data.Z, train, data.x_test),
                               "updated", cfg, recorder)
        scores.append(values)
        models[name] = {"n_finetune": len(train[1]), "training": info,
                        "test_accuracy": accuracy(model, data.x_test),
                        "mean_abs": float(np.abs(values).mean()),
                        "median_abs": float(np.median(np.abs(values)))}
    result = {"figure": "fig7", "dataset": dataset, "size": size, "m": len(data.Z[1]),
              "n_test": len(data.x_test[1]), "pretrain": pretrain_info, "models": models,
              "ratio_mean_abs": models["C"]["mean_abs"] / models["D"]["mean_abs"],
              "estimator_warnings": recorder.messages, "paper": PAPER["fig7"]}
    fig = _distribution_plot(
        scores, [f"C: {n_small} finetune examples", f"D: {3 * n_small} (3x)"],
        f"finetune size ({dataset}, Case 2); paper: 0.22 vs 0.15")
    return _save(result, png, js, fig)


FIGURES = {"fig2": fig2, "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6,
           "fig7": fig7}


def run(figure, dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Run one of the paper's experiments by name and return its numbers.

    ``figure`` is one of ``"fig2"`` ... ``"fig7"`` (the functions of :data:`FIGURES`).
    Each experiment builds and trains its pretrain/finetune problem with the
    hyper-parameters ``CONFIGS[dataset, size]``, saves ``<out>/<figure>-<dataset>-<size>.png``
    and a JSON of the returned numbers beside it, and caches trained weights and
    leave-one-out retrains in ``<out>/cache``. What each figure computes:

    * ``"fig2"`` (paper Fig. 2): Case 1 (embedding fixed during finetuning). The
      predicted change of the summed test loss ``-I(z)/m`` against leave-one-out
      retraining (:func:`skmsif.validation.leave_one_out`) of the ``n_top`` pretrain
      examples of largest ``|I|`` plus ``n_random`` random ones; Pearson and Spearman
      correlations on top, random and all, for the estimator and the baselines of
      :mod:`skmsif.baselines` against the same retrains.
    * ``"fig4"`` (paper Fig. 4): the same as ``"fig2"`` (same removals; the cached
      retrains are reused), with the identity-Hessian baseline highlighted.
    * ``"fig5"`` (paper Fig. 5): as ``"fig2"`` in Case 2 (embedding updated during
      finetuning, with the proximity term ``alpha``).
    * ``"fig3"`` (paper Fig. 3): the most harmful pretrain examples (largest ``I``) for
      the misclassified finetune test examples of largest loss, and whether they are
      "low quality": their pretrain loss and error rate against the whole pretrain set.
    * ``"fig6"`` (paper Fig. 6): task similarity. Mean ``|I|`` when finetuning on the
      pretrain task itself (task A: the pretrain classes, on held-out data) and on other
      classes (task B), embedding fixed.
    * ``"fig7"`` (paper Fig. 7): finetune size. Mean ``|I|`` of model C and of model D
      with 3x C's finetune examples (and 3x its steps under the Adam recipe),
      embedding updated.

    Parameters
    ----------
    figure : {"fig2", "fig3", "fig4", "fig5", "fig6", "fig7"}
        The experiment to run (see above).
    dataset : {"digits", "fashion-mnist"}, default="digits"
        The data set. Fashion-MNIST must be installed
        (:func:`skmsif.datasets.fashion_mnist_available`).
    size : {"tiny", "full"}, default="full"
        ``"tiny"`` runs in seconds (a smoke run); ``"full"`` is the set-up reported in
        ``doc/guide/results.md`` (see :data:`CONFIGS`).
    out : str or path-like, default="results"
        Folder for the PNG, the JSON and the cache; created if missing.
    n_jobs : int, default=None
        Parallel leave-one-out retrains (joblib) of ``"fig2"``, ``"fig4"`` and
        ``"fig5"``; the other figures do not retrain and ignore it.
    verbose : int, default=0
        Verbosity of the leave-one-out retrains (``"fig2"``, ``"fig4"``, ``"fig5"``).

    Returns
    -------
    result : dict
        The numbers the experiment measured (also written to the JSON), with ``"png"``
        and ``"json"``, the paths of the saved files. ``"fig2"``, ``"fig4"``, ``"fig5"``:
        ``"metrics"`` (per method and group ``all``/``top``/``random``, the output of
        :func:`skmsif.validation.faithfulness`), ``"audit"`` (the indices removed, their
        groups, predicted and actual changes), ``"leave_one_out"``, ``"estimator"``,
        ``"training"`` and ``"seconds"``. ``"fig3"``: ``"rows"`` (per explained test
        example, its ``label``, ``predicted`` class and the ``harmful`` pretrain indices
        with their ``harmful_influence``) and ``"quality"``. ``"fig6"``: ``"tasks"`` and
        ``"fig7"``: ``"models"``, each with ``mean_abs`` and ``test_accuracy`` per
        model, and ``"ratio_mean_abs"``. All include ``"paper"``, the paper's numbers
        where it reports them.

    Raises
    ------
    ValueError
        If ``figure``, ``dataset`` or ``size`` is not one of the names above.

    See Also
    --------
    skmsif.validation.leave_one_out : The retrained ground truth of the correlations.
    skmsif.validation.faithfulness : The correlations between predicted and actual.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from paper.figures import run
    >>> with tempfile.TemporaryDirectory() as out:
    ...     result = run("fig3", dataset="digits", size="tiny", out=out)
    ...     sorted(path.name for path in Path(out).iterdir())
    ['cache', 'fig3-digits-tiny.json', 'fig3-digits-tiny.png']
    >>> result["m"], len(result["rows"])
    (100, 2)
    >>> row = result["rows"][0]
    >>> bool(row["predicted"] != row["label"]), len(row["harmful"])
    (True, 3)
    >>> bool((row["harmful_influence"] > 0).all())
    True
    """
    if figure not in FIGURES:
        raise ValueError(f"figure={figure!r} is not one of {sorted(FIGURES)}.")
    return FIGURES[figure](dataset=dataset, size=size, out=out, n_jobs=n_jobs,
                           verbose=verbose)
