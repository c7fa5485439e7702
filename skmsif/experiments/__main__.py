"""``python -m skmsif.experiments <fig> --dataset digits|fashion-mnist --size tiny|full``."""

import argparse
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


def main(argv=None):
    from . import DATASETS, FIGURES, SIZES, run

    parser = argparse.ArgumentParser(
        prog="python -m skmsif.experiments",
        description="Reproduce a figure of Chen et al., 'Multi-Stage Influence Function'.")
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


if __name__ == "__main__":
    sys.exit(main())
