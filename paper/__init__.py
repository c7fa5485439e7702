"""The paper reproduction: Chen et al., "Multi-Stage Influence Function", Sec. 4.

Not part of the installed package (``setup.py`` ships ``skmsif`` only); run it from the
repository root, where ``import paper`` finds this folder::

    python -m paper fig2 --dataset digits --size full --out results/digits
    python -m paper cleansing --size full --out-dir doc/figures

Modules, in the order they depend on each other:

* :mod:`paper.models`: the networks (digits MLP, the paper's CNN, the turn-over MLP);
* :mod:`paper.training`: ``fit_lbfgs`` / ``fit_adam`` on skmsif's training engine, and
  the evaluation helpers ``total_loss``, ``per_example_loss``, ``accuracy``;
* :mod:`paper.problems`: the trained problems and hyper-parameters of each figure;
* :mod:`paper.figures`: Figs. 2-7 (``run``), each saving a PNG and a JSON;
* :mod:`paper.cleansing`: turn-over dropout against the multi-stage influence function.

Any other module or package here with a ``main(argv)`` (such as ``paper/text/``) runs as
``python -m paper NAME ...``.

``doc/guide/results.md`` reports what these commands measured.
"""
