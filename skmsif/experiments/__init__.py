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
reported in ``doc/results.md``. Leave-one-out retrains are cached in ``OUT/cache``, so
``fig4`` after ``fig2`` costs no retraining.
"""

from ._figures import FIGURES, fig2, fig3, fig4, fig5, fig6, fig7
from ._setup import CONFIGS, DATASETS, SIZES

__all__ = ["run", "FIGURES", "CONFIGS", "DATASETS", "SIZES", "fig2", "fig3", "fig4", "fig5",
           "fig6", "fig7"]


def run(figure, dataset="digits", size="full", out="results", n_jobs=None, verbose=0):
    """Run one experiment by name (``"fig2"`` ... ``"fig7"``); returns its numbers."""
    if figure not in FIGURES:
        raise ValueError(f"figure={figure!r} is not one of {sorted(FIGURES)}.")
    return FIGURES[figure](dataset=dataset, size=size, out=out, n_jobs=n_jobs,
                           verbose=verbose)
