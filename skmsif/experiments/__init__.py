"""The paper's experiments (Chen et al., "Multi-Stage Influence Function", Sec. 4).

Run one from the command line; it saves a PNG and a JSON of its numbers in ``--out``::

    python -m skmsif.experiments fig2 --dataset digits --size full --out doc/figures

* ``fig2``: Case 1 (embedding fixed), predicted change of the test loss ``-I(z)/m`` vs
  leave-one-out retraining, on the top-30 pretrain examples by ``|I|`` plus 30 random
  ones; Pearson and Spearman for top, random and all, for the estimator and the
  baselines of :mod:`skmsif.baselines` against the same retrains.
* ``fig4``: the same with the identity-Hessian baseline highlighted.
* ``fig5``: Case 2 (embedding updated during finetuning).
* ``fig3``: the most harmful pretrain examples for misclassified test examples.
* ``fig6``: task similarity: mean ``|I|`` when finetuning on the pretrain task itself vs
  on other classes.
* ``fig7``: finetune size: mean ``|I|`` with 3x the finetune data (and steps).

``--size tiny`` runs each in seconds (the tests use it); ``--size full`` is the set-up
reported in ``doc/guide/results.md``. Leave-one-out retrains are cached in ``OUT/cache``,
so ``fig4`` after ``fig2`` costs no retraining.

From Python, :func:`run` runs an experiment by name and returns its numbers.
"""

from ._figures import FIGURES, fig2, fig3, fig4, fig5, fig6, fig7  # noqa: F401
from ._setup import CONFIGS, DATASETS, SIZES

# ``run`` is the one documented entry point; ``fig2`` ... ``fig7`` (what it dispatches to)
# stay importable from here but are not listed: most take longer than an example may.
__all__ = ["run", "FIGURES", "CONFIGS", "DATASETS", "SIZES"]


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
    >>> from skmsif.experiments import run
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
