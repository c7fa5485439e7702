"""``python -m paper <command> [options]``, run from the repository root.

Commands:

* ``fig2`` ... ``fig7``: one of the paper's figures (:func:`paper.figures.run`), with
  ``--dataset digits|fashion-mnist --size tiny|full --out FOLDER --n-jobs N --threads T``;
* ``cleansing``: turn-over dropout against the multi-stage influence function on digits
  (:func:`paper.cleansing.main`; ``python -m paper cleansing --help``);
* any other module ``paper/NAME.py`` (or package ``paper/NAME/`` with a ``__main__.py``)
  that defines ``main(argv)`` runs as ``NAME``: ``python -m paper NAME ...``.
"""

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time


def _summary(result):
    """The headline numbers of a result, for the terminal."""
    lines = []
    if "metrics" in result:
        for method, groups in result["metrics"].items():
            lines.append(f"  {method:14s} " + "  ".join(
                f"{group}: r={values['pearson']:+.3f} rho={values['spearman']:+.3f}"
                for group, values in groups.items()))
    for key in ("tasks", "models"):
        for name, values in result.get(key, {}).items():
            lines.append(f"  {name}: mean |I| = {values['mean_abs']:.4g} "
                         f"(test accuracy {values['test_accuracy']:.3f})")
    if "quality" in result:
        lines.append("  " + json.dumps(result["quality"]))
    return "\n".join(lines)


def _module_command(name):
    """``main`` of the module ``paper/<name>.py``, or of the package ``paper/<name>/``'s
    ``__main__.py``; ``None`` when there is no such command."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    package = __package__ or "paper"
    for module_name in (f"{package}.{name}", f"{package}.{name}.__main__"):
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # paper.<name> is a module, not a package
            continue
        command = getattr(importlib.import_module(module_name), "main", None)
        if command is not None:
            return command
    return None


def figure_main(argv):
    """Run one figure from the command line; returns the exit status."""
    from .figures import DATASETS, FIGURES, SIZES, run

    parser = argparse.ArgumentParser(
        prog="python -m paper",
        description="Reproduce a figure of Chen et al., 'Multi-Stage Influence Function' "
                    "(or run 'python -m paper cleansing --help' for the turn-over "
                    "dropout comparison).")
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--out", default="results", help="folder for the PNG, JSON, cache")
    parser.add_argument("--n-jobs", type=int, default=None,
                        help="parallel leave-one-out retrains (joblib)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: leave torch's setting)")
    parser.add_argument("--verbose", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args.figure, args.dataset, args.size, args.out, n_jobs=args.n_jobs,
                 verbose=args.verbose)
    print(f"{args.figure} ({args.dataset}, {args.size}) in {time.perf_counter() - start:.1f} s"
          f" -> {os.fspath(result['png'])}, {os.fspath(result['json'])}")
    print(_summary(result))
    return 0


def main(argv=None):
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its command; returns the status."""
    from .figures import FIGURES

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in FIGURES and not argv[0].startswith("-"):
        command = _module_command(argv[0])
        if command is not None:
            status = command(argv[1:])
            return status if isinstance(status, int) else 0
    return figure_main(argv)


if __name__ == "__main__":
    sys.exit(main())
