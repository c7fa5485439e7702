"""The paper's NLP experiment on the text problem: tables, costs, faithfulness.

:func:`run_experiment` builds (or loads) the two-stage problem of :mod:`paper.text`
and, for each influence method (EK-FAC, Gauss-Newton CG, the identity baseline):

1. fits the estimator and scores every pretrain tweet on the summed test loss, timing
   both (wall and CPU seconds);
2. the analogue of the paper's Table 2: for a few misclassified finetune test tweets,
   the pretrain tweets of largest positive influence (harmful: removing them lowers that
   tweet's loss) and of most negative influence (helpful), from rows of
   ``influence(x_test)``;
3. faithfulness: for the pretrain tweets of largest ``|score|`` and a seeded random
   control, the predicted change of the summed test loss on removing each one,
   ``-score / m``, next to the actual change from :func:`paper.text.retrain_without`
   (the paper's protocol), with Pearson and Spearman correlations per method;
4. a figure of predicted against actual changes, one panel per method.

Run ``python -m paper.text experiment --size full --case fixed`` (or
``python -m paper text experiment ...``); ``--help`` lists the options.
"""

import argparse
import json
import os
import time
import warnings
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from sklearn.utils import Bunch

from skmsif import MultiStageInfluenceEstimator
from skmsif.validation import audit_indices, faithfulness

from ._problem import CASES, SIZES, default_cache_dir, make_problem
from ._retrain import retrain_without
from ._training import per_example_loss

#: The influence methods, by name: estimator settings added to the problem's own.
#: ``"ekfac"``: eigenvalue-corrected Kronecker-factored Gauss-Newton (curvature "auto"
#: resolves to Gauss-Newton); ``"cg-gn"``: conjugate gradients on the exact
#: Gauss-Newton products; ``"identity"``: the paper's baseline (both inverse curvatures
#: replaced by the identity).
METHODS = {
    "ekfac": {"hessian": "ekfac"},
    "cg-gn": {"hessian": "cg", "curvature": "gauss_newton", "iterative_solver": "cg"},
    "identity": {"hessian": "identity"},
}
DEFAULT_METHODS = ("ekfac", "cg-gn", "identity")
LABELS = {"ekfac": "EK-FAC", "cg-gn": "Gauss-Newton CG", "identity": "identity"}


def _check_count(name, value, minimum=0):
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def _subset(data, rows):
    """The rows ``rows`` of a dict of tensors."""
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    return {key: value[rows] for key, value in data.items()}


def _clock():
    return time.perf_counter(), time.process_time()


def _elapsed(started):
    return time.perf_counter() - started[0], time.process_time() - started[1]


def _say(verbose, message):
    if verbose:
        print(f"[paper.text experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def misclassified(problem, n_examples=3):
    """Finetune test tweets the finetune model gets wrong, most confidently wrong first.

    Parameters
    ----------
    problem : sklearn.utils.Bunch
        From :func:`paper.text.make_problem`.
    n_examples : int, default=3
        How many to return at most (fewer when fewer are misclassified).

    Returns
    -------
    picks : sklearn.utils.Bunch
        ``indices`` (rows of ``x_test``, ordered by decreasing test loss),
        ``predicted`` (the predicted label index of every test tweet), ``probability``
        (the model's probability of its prediction, every test tweet) and ``loss``
        (per test tweet).
    """
    n_examples = _check_count("n_examples", n_examples)
    model = problem.finetune_model
    inputs = {key: value for key, value in problem.x_test.items() if key != "labels"}
    with torch.no_grad():
        probabilities = torch.softmax(model(**inputs).logits, dim=-1).double().numpy()
    predicted = probabilities.argmax(axis=1)
    labels = problem.x_test["labels"].numpy()
    loss = np.asarray(per_example_loss(model, problem.x_test), dtype=np.float64)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-loss[wrong], kind="stable")]
    return Bunch(indices=order[:n_examples], predicted=predicted,
                 probability=probabilities.max(axis=1), loss=loss)


def _neighbours(row, problem, n_neighbours):
    """The ``n_neighbours`` most harmful (largest) and most helpful (smallest) entries
    of one influence row, as lists of dicts."""
    labels = problem.Z["labels"].numpy()

    def describe(index):
        return {"index": int(index), "text": problem.Z_text[index],
                "label": problem.pretrain_labels[labels[index]],
                "influence": float(row[index])}

    order = np.argsort(-row, kind="stable")
    return ([describe(i) for i in order[:n_neighbours]],
            [describe(i) for i in order[::-1][:n_neighbours]])


def run_experiment(size="full", case="fixed", *, methods=DEFAULT_METHODS,
                   table_methods=("ekfac", "identity"), n_top=20, n_random=20,
                   n_examples=3, n_neighbours=3, random_state=0,
                   cache_dir=None, hessian_samples=None, cg_max_iter=200, cg_tol=1e-6,
                   n_jobs=1, out=None, verbose=0):
    """Run the text experiment for one case: tables, costs, faithfulness, figure.

    Parameters
    ----------
    size : {"full", "tiny"}, default="full"
        The problem's size (:func:`paper.text.make_problem`).
    case : {"fixed", "updated"}, default="fixed"
        Case 1 (shared, frozen encoder) or Case 2 (encoder finetuned too).
    methods : sequence of str, default=("ekfac", "cg-gn", "identity")
        Influence methods, names of :data:`METHODS`. The first one picks the removals
        of the faithfulness check (its largest ``|score|``), so it should be the
        method under study.
    table_methods : sequence of str, default=("ekfac", "identity")
        The methods of ``methods`` whose influence rows on the misclassified test
        tweets make the tables (one solve per test tweet; the others give the summed
        scores only, one solve).
    n_top, n_random : int, default=20
        Removals for the faithfulness check: the pretrain tweets of largest ``|score|``
        under the first method, then ``n_random`` others drawn with ``random_state``
        (:func:`skmsif.validation.audit_indices`). ``n_top + n_random = 0`` skips the
        retraining.
    n_examples : int, default=3
        Misclassified test tweets for the tables (most confidently wrong first).
    n_neighbours : int, default=3
        Pretrain tweets per table and direction (harmful, helpful).
    random_state : int, default=0
        Seeds the problem (data, initialisation) and the random removals.
    cache_dir : str, path-like, None or False, default=None
        Trained weights' cache (:func:`paper.text.make_problem`); the figure goes
        there too unless ``out`` says otherwise.
    hessian_samples : int, default=None
        Passed to the ``"cg-gn"`` estimator: pretrain curvature products on a random
        subsample of this size (``None``: all of ``Z``).
    cg_max_iter : int, default=200
        Iterations at most per ``"cg-gn"`` solve.
    cg_tol : float, default=1e-6
        Relative residual at which a ``"cg-gn"`` solve stops; a solve that stops short
        is recorded in the method's ``warnings`` and ``solver_history``.
    n_jobs : int, default=1
        Parallel leave-one-out retrains (each one torch thread).
    out : str, path-like, None or False, default=None
        PNG file of the figure. ``None``: ``text-<size>-<case>.png`` in the cache folder
        (or the working folder when ``cache_dir=False``); ``False``: no figure.
    verbose : int, default=0
        Print progress.

    Returns
    -------
    result : sklearn.utils.Bunch
        ``size``, ``case``, ``random_state``, ``threads`` (torch threads in use),
        ``n_pretrain`` (``m``), ``n_test``; ``problem`` (the Bunch of
        :func:`paper.text.make_problem`); ``problem_info`` (its stationarity and
        accuracy report); ``methods``: per method a Bunch of ``params`` (estimator
        keyword arguments), ``estimator`` (fitted), ``scores`` (shape ``(m,)``),
        ``fit_seconds``, ``fit_cpu_seconds``, ``score_seconds``, ``score_cpu_seconds``,
        ``influence_seconds``, ``influence_cpu_seconds`` (the rows of the tables),
        ``stationarity``, ``solver_history`` (iterative solves: iterations and residual
        of each), ``warnings`` (messages raised while fitting and scoring, deprecations
        left out) and ``influence_rows`` (shape ``(len(examples), m)``, or ``None``
        outside ``table_methods``);
        ``examples``: per misclassified test tweet a dict of ``test_index``,
        ``text``, ``label`` and ``predicted`` (names), ``probability`` (of the
        prediction), ``loss`` and, per method of ``table_methods``, ``influence_row``
        (shape ``(m,)``), ``harmful`` and ``helpful`` (lists of dicts ``index``,
        ``text``, ``label``, ``influence``); ``indices`` (the removed pretrain tweets), ``groups``
        (``"top"`` and ``"random"`` positions in ``indices``), ``actual`` (change of
        the summed test loss, retrained), ``predicted`` (per method, ``-scores[indices]
        / m``), ``metrics`` (per method, :func:`skmsif.validation.faithfulness` of
        ``predicted`` against ``actual``), ``retrain_seconds`` and
        ``retrain_cpu_seconds`` (per retrain), ``retrain_wall_seconds`` (all of them,
        reference included), ``retrain_settings``; ``figure`` (the PNG's path, or
        ``None`` without removals or with ``out=False``); ``total_seconds``.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}.")
    if case not in CASES:
        raise ValueError(f"case={case!r} is not one of {CASES}.")
    if isinstance(methods, str):
        raise ValueError(f"methods must be a sequence of names; got the string {methods!r}"
                         f" (write [{methods!r}]).")
    methods = list(methods)
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods={methods!r}: give one or more distinct names among "
                         f"{sorted(METHODS)}.")
    if isinstance(table_methods, str):
        raise ValueError(f"table_methods must be a sequence of names; got the string "
                         f"{table_methods!r} (write [{table_methods!r}]).")
    table_methods = [name for name in methods if name in set(table_methods)]
    if not table_methods:
        raise ValueError(f"table_methods: none of them is among methods={methods!r}.")
    n_top = _check_count("n_top", n_top)
    n_random = _check_count("n_random", n_random)
    n_examples = _check_count("n_examples", n_examples)
    n_neighbours = _check_count("n_neighbours", n_neighbours, minimum=1)
    cg_max_iter = _check_count("cg_max_iter", cg_max_iter, minimum=1)
    if not isinstance(cg_tol, Real) or not cg_tol > 0:
        raise ValueError(f"cg_tol must be a number > 0; got {cg_tol!r}.")

    started = _clock()
    _say(verbose, f"building the {size} problem, case {case!r} ...")
    problem = make_problem(size, random_state, case, cache_dir=cache_dir)
    _say(verbose, "problem ready in {:.1f} s wall ({:.1f} s CPU)".format(*_elapsed(started)))
    m = len(problem.Z["labels"])
    result = Bunch(size=size, case=case, random_state=random_state,
                   threads=torch.get_num_threads(), n_pretrain=m,
                   n_test=len(problem.x_test["labels"]), problem=problem,
                   problem_info={stage: dict(values) for stage, values in problem.info.items()},
                   methods={})

    picks = misclassified(problem, n_examples)
    x_shown = _subset(problem.x_test, picks.indices)

    for name in methods:
        params = {**problem.estimator_params, **METHODS[name]}
        if name == "cg-gn":
            params.update(max_iter=cg_max_iter, tol=cg_tol, hessian_samples=hessian_samples,
                          random_state=random_state)
        est = MultiStageInfluenceEstimator(**params, verbose=max(verbose - 1, 0))
        _say(verbose, f"{name}: fit ...")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clock = _clock()
            est.fit(problem.pretrain_model, problem.finetune_model, problem.Z, problem.X)
            fit_seconds = _elapsed(clock)
            _say(verbose, "{}: fit {:.1f} s wall ({:.1f} s CPU); score ...".format(
                name, *fit_seconds))
            clock = _clock()
            scores = est.score(problem.x_test)
            score_seconds = _elapsed(clock)
            clock = _clock()
            rows = (est.influence(x_shown) if len(picks.indices) and name in table_methods
                    else None)
            influence_seconds = _elapsed(clock)
        history = {stage: list(getattr(getattr(est, f"{stage}_solver_", None), "history_",
                                       None) or [])
                   for stage in ("pretrain", "finetune")}
        result.methods[name] = Bunch(
            params={key: value for key, value in params.items()}, estimator=est,
            scores=scores, fit_seconds=fit_seconds[0], fit_cpu_seconds=fit_seconds[1],
            score_seconds=score_seconds[0], score_cpu_seconds=score_seconds[1],
            influence_seconds=influence_seconds[0],
            influence_cpu_seconds=influence_seconds[1],
            stationarity=getattr(est, "stationarity_", None), solver_history=history,
            warnings=[f"{w.category.__name__}: {w.message}" for w in caught
                      if not issubclass(w.category, DeprecationWarning)],
            influence_rows=rows)
        _say(verbose, "{}: score {:.1f} s wall ({:.1f} s CPU), table rows {:.1f} s".format(
            name, *score_seconds, influence_seconds[0]))
        for message in result.methods[name].warnings:
            _say(verbose, f"  {message[:300]}")

    labels = problem.x_test["labels"].numpy()
    result.examples = []
    for position, index in enumerate(picks.indices):
        example = {"test_index": int(index), "text": problem.x_test_text[index],
                   "label": problem.finetune_labels[labels[index]],
                   "predicted": problem.finetune_labels[picks.predicted[index]],
                   "probability": float(picks.probability[index]),
                   "loss": float(picks.loss[index]), "methods": {}}
        for name in table_methods:
            row = np.asarray(result.methods[name].influence_rows[position])
            harmful, helpful = _neighbours(row, problem, n_neighbours)
            example["methods"][name] = {"influence_row": row, "harmful": harmful,
                                        "helpful": helpful}
        result.examples.append(example)

    first = methods[0]
    result.indices = np.zeros(0, dtype=np.int64)
    result.groups = {"top": np.zeros(0, dtype=np.int64), "random": np.zeros(0, dtype=np.int64)}
    result.actual = np.zeros(0)
    result.predicted = {name: np.zeros(0) for name in methods}
    result.metrics, result.figure = {}, None
    result.retrain_seconds = result.retrain_cpu_seconds = np.zeros(0)
    result.retrain_wall_seconds, result.retrain_settings = 0.0, None
    if n_top + n_random:
        audit = audit_indices(result.methods[first].scores, n_top=min(n_top, m),
                              n_random=min(n_random, m - min(n_top, m)),
                              random_state=random_state)
        result.indices, result.groups = audit.indices, audit.groups
        _say(verbose, f"retraining without each of {len(audit.indices)} pretrain tweets "
             f"(n_jobs={n_jobs}) ...")
        clock = _clock()
        actual, info = retrain_without(problem, [int(i) for i in audit.indices],
                                       n_jobs=n_jobs, return_info=True)
        result.retrain_wall_seconds = time.perf_counter() - clock[0]
        result.actual = actual
        result.retrain_seconds, result.retrain_cpu_seconds = info.seconds, info.cpu_seconds
        result.retrain_settings = info.settings
        _say(verbose, f"retrains done in {result.retrain_wall_seconds:.1f} s wall")
        for name in methods:
            predicted = -result.methods[name].scores[audit.indices] / m
            result.predicted[name] = predicted
            result.metrics[name] = faithfulness(predicted, actual, groups=audit.groups)
        if out is None:
            folder = (Path.cwd() if cache_dir is False
                      else Path(cache_dir) if cache_dir is not None else default_cache_dir())
            out = folder / f"text-{size}-{case}.png"
        if out is not False:
            result.figure = plot_faithfulness(result, out)
    result.total_seconds = time.perf_counter() - started[0]
    return result


def plot_faithfulness(result, path):
    """Predicted against actual changes of the summed test loss, one panel per method.

    Parameters
    ----------
    result : sklearn.utils.Bunch
        From :func:`run_experiment`, with removals.
    path : str or path-like
        Where the PNG goes (folders are created).

    Returns
    -------
    path : pathlib.Path
    """
    import matplotlib.pyplot as plt  # without a display, matplotlib picks Agg itself

    names = list(result.predicted)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    top = np.zeros(len(result.actual), dtype=bool)
    top[result.groups["top"]] = True
    for ax, name in zip(axes[0], names):
        predicted, actual = result.predicted[name], result.actual
        ax.scatter(actual[top], predicted[top], s=18, label="largest |score|")
        ax.scatter(actual[~top], predicted[~top], s=18, marker="s", label="random")
        # Each axis spans its own data, so that the order shows even when the scales
        # differ (the slope says by how much); y = x is drawn where it is in view.
        for values, setter in ((actual, ax.set_xlim), (predicted, ax.set_ylim)):
            low, high = float(values.min()), float(values.max())
            pad = 0.08 * (high - low) or 1e-12
            setter(low - pad, high + pad)
        ax.axline((0.0, 0.0), slope=1.0, color="grey", lw=0.8, ls="--", label="y = x")
        values = result.metrics[name]["all"]
        ax.set_title(f"{LABELS.get(name, name)}: r = {values['pearson']:.2f}, "
                     f"rho = {values['spearman']:.2f}, slope {values['slope']:.3g}",
                     fontsize=10)
        ax.set_xlabel("actual change of test loss (retrained)")
        ax.axhline(0, color="black", lw=0.4)
        ax.axvline(0, color="black", lw=0.4)
    axes[0][0].set_ylabel("predicted change, -score / m")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Text problem ({result.size}, case {result.case!r}): removing one "
                 f"pretrain tweet", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- reports


def _cell(text, width=90):
    """A tweet as a markdown table cell: one line, pipes escaped, shortened."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 3] + "..."


def example_table(result, position=0, methods=None):
    """The Table-2 analogue for one misclassified test tweet, as markdown.

    Parameters
    ----------
    result : sklearn.utils.Bunch
        From :func:`run_experiment`.
    position : int, default=0
        Which of ``result.examples``.
    methods : sequence of str, default=None
        Methods side by side (``None``: all of the result's).

    Returns
    -------
    table : str
        A heading line with the test tweet, its true and predicted label, then one
        table row per rank and direction (harmful, helpful), with, per method, the
        pretrain tweet, its label and its influence on the test tweet.
    """
    if not 0 <= position < len(result.examples):
        raise ValueError(f"position={position!r}: the result has "
                         f"{len(result.examples)} misclassified examples.")
    example = result.examples[position]
    methods = list(example["methods"]) if methods is None else list(methods)
    lines = [f"Test tweet {example['test_index']} (true: {example['label']}, predicted: "
             f"{example['predicted']} with probability {example['probability']:.2f}, "
             f"loss {example['loss']:.2f}): \"{_cell(example['text'], 200)}\"", ""]
    header = "| | " + " | ".join(f"{LABELS.get(name, name)}: pretrain tweet | label | I"
                                  for name in methods) + " |"
    lines += [header, "|---|" + "---|---|---:|" * len(methods)]
    for kind in ("harmful", "helpful"):
        for rank in range(len(example["methods"][methods[0]][kind])):
            cells = []
            for name in methods:
                entry = example["methods"][name][kind][rank]
                cells.append(f"{_cell(entry['text'])} | {entry['label']} | "
                             f"{entry['influence']:+.3g}")
            lines.append(f"| {kind} {rank + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def faithfulness_table(result):
    """Per method: Pearson and Spearman (all removals, top, random) and costs, markdown."""
    n = len(result.actual)
    lines = ["| method | Pearson (all) | Spearman (all) | Pearson (top) | Spearman (top) | "
             "Pearson (random) | Spearman (random) | slope | fit + score (s wall / CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, method in result.methods.items():
        cost = (f"{method.fit_seconds + method.score_seconds:.1f} / "
                f"{method.fit_cpu_seconds + method.score_cpu_seconds:.1f}")
        if name not in result.metrics:
            lines.append(f"| {LABELS.get(name, name)} | " + "- | " * 7 + f"{cost} |")
            continue
        values = result.metrics[name]
        cells = [f"{values[group][key]:+.3f}" for group in ("all", "top", "random")
                 for key in ("pearson", "spearman")]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) +
                     f" | {values['all']['slope']:.3g} | {cost} |")
    if n:
        lines.append("")
        lines.append(f"{n} removals ({len(result.groups['top'])} of largest |score| under "
                     f"{LABELS.get(next(iter(result.methods)))}, "
                     f"{len(result.groups['random'])} random); retrains: "
                     f"{result.retrain_wall_seconds:.1f} s wall in all, "
                     f"{np.mean(result.retrain_seconds):.1f} s wall / "
                     f"{np.mean(result.retrain_cpu_seconds):.1f} s CPU each.")
    return "\n".join(lines)


def summary(result):
    """The JSON-ready numbers of a result (no models, no full arrays of scores)."""
    def method_summary(method):
        return {key: method[key] for key in (
            "params", "fit_seconds", "fit_cpu_seconds", "score_seconds", "score_cpu_seconds",
            "influence_seconds", "influence_cpu_seconds", "stationarity", "solver_history",
            "warnings")}

    return {
        "size": result.size, "case": result.case, "random_state": result.random_state,
        "threads": result.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "n_pretrain": result.n_pretrain, "n_test": result.n_test,
        "problem_info": result.problem_info,
        "methods": {name: method_summary(method) for name, method in result.methods.items()},
        "examples": [{key: value for key, value in example.items() if key != "methods"} |
                     {"methods": {name: {k: v for k, v in entry.items()
                                         if k != "influence_row"}
                                  for name, entry in example["methods"].items()}}
                     for example in result.examples],
        "indices": result.indices.tolist(),
        "groups": {key: value.tolist() for key, value in result.groups.items()},
        "actual": result.actual.tolist(),
        "predicted": {name: values.tolist() for name, values in result.predicted.items()},
        "metrics": result.metrics,
        "retrain_seconds": np.asarray(result.retrain_seconds).tolist(),
        "retrain_cpu_seconds": np.asarray(result.retrain_cpu_seconds).tolist(),
        "retrain_wall_seconds": result.retrain_wall_seconds,
        "retrain_settings": result.retrain_settings,
        "figure": None if result.figure is None else os.fspath(result.figure),
        "total_seconds": result.total_seconds,
    }


def main(argv=None):
    """``python -m paper.text experiment``: run :func:`run_experiment`, print the tables."""
    parser = argparse.ArgumentParser(
        prog="python -m paper.text experiment",
        description="The paper's NLP experiment on the text problem: influence tables for "
                    "misclassified test tweets, costs, and faithfulness against "
                    "leave-one-out retraining, per influence method.")
    parser.add_argument("--size", default="full", choices=SIZES)
    parser.add_argument("--case", default="fixed", choices=CASES)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated, among " + ", ".join(METHODS) +
                             " (the first picks the removals; default: %(default)s)")
    parser.add_argument("--n-top", type=int, default=20)
    parser.add_argument("--n-random", type=int, default=20)
    parser.add_argument("--n-examples", type=int, default=3)
    parser.add_argument("--n-neighbours", type=int, default=3)
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--hessian-samples", type=int, default=None,
                        help="pretrain curvature subsample of the cg-gn method")
    parser.add_argument("--cg-max-iter", type=int, default=200)
    parser.add_argument("--cg-tol", type=float, default=1e-6)
    parser.add_argument("--cache-dir", default=None,
                        help="trained weights (default: paper.text.default_cache_dir()); "
                             "'none' trains afresh, caching nothing")
    parser.add_argument("--out", default=None, help="PNG of the figure (default: in the "
                                                    "cache folder)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel retrains")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    methods = [name.strip() for name in args.methods.split(",")]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        parser.error(f"--methods {args.methods}: give distinct names among "
                     f"{', '.join(METHODS)}.")
    torch.set_num_threads(args.threads)
    cache_dir = False if (args.cache_dir or "").lower() == "none" else args.cache_dir
    result = run_experiment(
        args.size, args.case, methods=methods,
        n_top=args.n_top, n_random=args.n_random, n_examples=args.n_examples,
        n_neighbours=args.n_neighbours, random_state=args.random_state,
        cache_dir=cache_dir, hessian_samples=args.hessian_samples,
        cg_max_iter=args.cg_max_iter, cg_tol=args.cg_tol, n_jobs=args.n_jobs, out=args.out,
        verbose=args.verbose)
    info = result.problem_info
    print(f"\n## Text problem, size {result.size}, case {result.case!r}: {result.n_pretrain} "
          f"pretrain tweets, {result.n_test} test tweets; torch threads {result.threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("stationarity: pretrain grad_max {:.3g} (encoder {:.3g}, head {:.3g}); finetune "
          "grad_max {:.3g}; accuracies: pretrain test {:.3f}, finetune test {:.3f}".format(
              info["pretrain"]["grad_max"], info["pretrain"].get("encoder_grad_max", np.nan),
              info["pretrain"].get("head_grad_max", np.nan), info["finetune"]["grad_max"],
              info["pretrain"]["test_accuracy"], info["finetune"]["test_accuracy"]))
    print("\n### Costs (fit + score of all pretrain tweets on the summed test loss)\n")
    print("| method | fit (s wall / CPU) | score (s wall / CPU) | table rows (s wall) |")
    print("|---|---:|---:|---:|")
    for name, method in result.methods.items():
        print(f"| {LABELS.get(name, name)} | {method.fit_seconds:.1f} / "
              f"{method.fit_cpu_seconds:.1f} | {method.score_seconds:.1f} / "
              f"{method.score_cpu_seconds:.1f} | {method.influence_seconds:.1f} |")
    for position in range(len(result.examples)):
        print(f"\n### Misclassified test tweet {position + 1}\n")
        print(example_table(result, position))
    print("\n### Faithfulness: predicted (-score / m) against retrained changes\n")
    print(faithfulness_table(result))
    if result.figure is not None:
        print(f"\nfigure: {os.fspath(result.figure)}")
    print(f"total: {result.total_seconds:.1f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(summary(result), indent=1, default=_json))
        print(f"numbers: {args.json}")
    return 0


def _json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return os.fspath(value)
    return str(value)
