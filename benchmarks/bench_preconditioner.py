"""Gauss-Newton CG with and without a Kronecker-factored preconditioner, on a small BERT.

The text problem of ``paper.text`` (a 2-layer BERT of width 64, 128k parameters, built
from a config, pretrained on 2,000 airline tweets, finetuned on 500 others; both cases):
for each case, ``hessian="cg", curvature="gauss_newton", iterative_solver="cg"`` with the
pretrain curvature on ``--hessian-samples`` tweets, once plain and once with
``preconditioner=`` each of ``--preconditioners``, everything else equal. Printed per run:
``fit`` and ``fit + score`` seconds, the iterations and final relative residual of the
pretrain and finetune solves, and the agreement (Spearman, Pearson, relative difference)
of each preconditioned run's scores with the plain run's.

The paper's CNN is measured the same way by ``benchmarks/bench_cnn.py`` (rows
``cg_budget`` and ``pcg``).

Run::

    python benchmarks/bench_preconditioner.py                 # full size, ~15 min a case
    python benchmarks/bench_preconditioner.py --size tiny     # seconds; the smoke test

The trained models come from ``paper.text.make_problem`` (trained once and cached).
Threads are pinned (torch and BLAS) to ``--threads`` (default 1).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: paper/


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--cases", default="fixed,updated")
    parser.add_argument("--preconditioners", default="ekfac",
                        help="comma-separated, among kfac and ekfac")
    parser.add_argument("--hessian-samples", type=int, default=1000)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None,
                        help="trained weights (default: paper.text.default_cache_dir())")
    args = parser.parse_args(argv)
    args.cases = [case for case in args.cases.split(",") if case]
    args.preconditioners = [name for name in args.preconditioners.split(",") if name]
    if set(args.cases) - {"fixed", "updated"} or set(args.preconditioners) - {"kfac",
                                                                              "ekfac"}:
        parser.error("cases are fixed/updated; preconditioners kfac/ekfac")
    return args


ARGS = _parse()
from _threads import pin_threads  # noqa: E402

pin_threads(ARGS.threads)  # before numpy, scipy and torch load

import numpy as np  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

from paper.text import make_problem  # noqa: E402
from skmsif import MultiStageInfluenceEstimator  # noqa: E402



def run(problem, preconditioner):
    params = {**problem.estimator_params, "hessian": "cg", "curvature": "gauss_newton",
              "iterative_solver": "cg", "max_iter": ARGS.max_iter, "tol": ARGS.tol,
              "hessian_samples": min(ARGS.hessian_samples, len(problem.Z["labels"])),
              "random_state": ARGS.seed, "preconditioner": preconditioner}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # residuals are reported
        start = time.perf_counter()
        est = MultiStageInfluenceEstimator(**params).fit(
            problem.pretrain_model, problem.finetune_model, problem.Z, problem.X)
        fit_seconds = time.perf_counter() - start
        scores = est.score(problem.x_test)
    seconds = time.perf_counter() - start
    solves = {stage: getattr(est, f"{stage}_solver_").history_[-1]
              for stage in ("pretrain", "finetune")}
    return scores, fit_seconds, seconds, solves


def main():
    print(f"Text problem ({ARGS.size}), Gauss-Newton CG, pretrain curvature on "
          f"{ARGS.hessian_samples} tweets, max_iter {ARGS.max_iter}, tol {ARGS.tol:g}; "
          f"{ARGS.threads} thread(s)", flush=True)
    for case in ARGS.cases:
        problem = make_problem(ARGS.size, ARGS.seed, case, cache_dir=ARGS.cache_dir)
        results = {}
        for preconditioner in [None] + ARGS.preconditioners:
            results[preconditioner] = run(problem, preconditioner)
            _, fit_seconds, seconds, solves = results[preconditioner]
            print(f"case {case}, preconditioner {preconditioner}: fit {fit_seconds:.1f} s, "
                  f"fit + score {seconds:.1f} s; " + "; ".join(
                      f"{stage} {entry['n_iter']} iterations, residual "
                      f"{entry['residual']:.2e}" for stage, entry in solves.items()),
                  flush=True)
        plain = results[None][0]
        for preconditioner in ARGS.preconditioners:
            scores = results[preconditioner][0]
            print(f"case {case}, {preconditioner} against plain: Spearman "
                  f"{spearmanr(scores, plain)[0]:.4f}, Pearson {pearsonr(scores, plain)[0]:.4f},"
                  f" relative difference "
                  f"{np.linalg.norm(scores - plain) / np.linalg.norm(plain):.2e}", flush=True)


if __name__ == "__main__":
    main()
