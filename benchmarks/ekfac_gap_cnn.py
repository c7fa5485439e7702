"""Where EK-FAC loses agreement with the Gauss-Newton solve on the paper's CNN.

On the set-up of ``benchmarks/bench_cnn.py`` (its cached data and models, m = 24,000,
Case 1, dampings 1e-2 / 1e-3, float32 passes, the pretrain curvature on
``--hessian-samples`` images, the head solved exactly), the pretrain stage's system
``(G + d I) x = b`` (``b`` the right-hand side of the summed test gradients) is solved
three ways, and each solution scored against all of Z:

* EK-FAC (``hessian="ekfac"``): block-diagonal over the layers, each block
  Kronecker-factored with corrected eigenvalues;
* the exact block-diagonal Gauss-Newton matrix (each layer's block of ``G``, no
  factorisation), by CG to relative residual 1e-8: what a perfect per-layer
  approximation would give;
* plain Gauss-Newton CG for 15 products (a converged solve is the reference of
  ``bench_cnn.py``).

Printed: each solution's relative residual in the full damped system, and the Spearman
and Pearson of its scores with the converged reference that ``bench_cnn.py`` left in its
cache folder (``cg_float64.npy``; run that first).

Run::

    python benchmarks/ekfac_gap_cnn.py          # about 5 minutes on one thread

It takes ``bench_cnn.py``'s options (``--m``, ``--hessian-samples``, ``--dtype``,
``--threads``, ``--cache-dir``, ...), which must match the run that left the reference.
"""

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cnn  # noqa: E402  (parses the same options: --m, --hessian-samples, ...)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

from skmsif._solvers import truncated_cg  # noqa: E402

CG_ITERATIONS = 15


def main():
    reference_path = bench_cnn.WORK / "cg_float64.npy"
    if not reference_path.is_file():
        sys.exit(f"{reference_path} is missing: run benchmarks/bench_cnn.py first.")
    reference = np.load(reference_path)
    data = bench_cnn.load_data()
    pretrain_model, finetune_model = bench_cnn.load_models()
    est = bench_cnn.estimator(hessian="ekfac", finetune_hessian="exact",
                              curvature="gauss_newton", dtype=bench_cnn.ARGS.dtype,
                              hessian_samples=bench_cnn.ARGS.hessian_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stationarity: reported by bench_cnn.py
        est.fit(pretrain_model, finetune_model, data["Z"], data["X"])
        state = est._state
        captured = {}
        backend = state.pretrain_backend
        solve = backend.solve

        def capture(rhs):
            captured["rhs"] = rhs.to(torch.float64)
            return solve(rhs)

        backend.solve = capture
        ekfac_scores = est.score(data["x_test"])
        backend.solve = solve
    rhs = captured["rhs"]
    operator, shift = state.pretrain_operator, backend.shift
    objective = state.pretrain
    layers = {}
    for name in objective.free:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    masks = []
    for names in layers.values():
        mask = torch.zeros(objective.n_params, dtype=torch.bool)
        mask[objective.offsets(names)] = True
        masks.append(mask)

    def full(vectors):
        return operator.matvec(vectors) + shift * vectors

    def block_diagonal(vectors):
        out = torch.zeros_like(vectors)
        for mask in masks:
            out[:, mask] = operator.matvec(vectors * mask)[:, mask]
        return out + shift * vectors

    def cg(apply, max_iter, rtol):  # the package's CG, on the one right-hand side
        return truncated_cg(lambda vector: apply(vector[None])[0], rhs[0], max_iter,
                            rtol)[None]

    def scores(solution):
        return -state.directional(solution, state.Z).sum(0)

    def report(label, solution, seconds, scored=None):
        residual = float((full(solution) - rhs).norm() / rhs.norm())
        scored = scores(solution) if scored is None else scored
        print(f"{label:<48} residual in (G + dI) {residual:8.3f}   Spearman "
              f"{spearmanr(scored, reference)[0]:.3f}   Pearson "
              f"{pearsonr(scored, reference)[0]:.3f}   {seconds:6.1f} s", flush=True)

    print(f"Pretrain stage of bench_cnn.py's problem, {objective.n_params} parameters in "
          f"{len(masks)} layers ({', '.join(f'{k}: {int(m.sum())}' for k, m in zip(layers, masks))}); "
          f"curvature on {bench_cnn.ARGS.hessian_samples} images; agreement with the "
          "converged Gauss-Newton CG scores", flush=True)
    start = time.perf_counter()
    report("EK-FAC", backend.solve(rhs), time.perf_counter() - start, ekfac_scores)
    start = time.perf_counter()
    solution = cg(block_diagonal, 500, 1e-8)
    report("exact block-diagonal Gauss-Newton (CG to 1e-8)", solution,
           time.perf_counter() - start)
    start = time.perf_counter()
    solution = cg(full, CG_ITERATIONS, 0.0)
    report(f"Gauss-Newton CG, {CG_ITERATIONS} products", solution,
           time.perf_counter() - start)


if __name__ == "__main__":
    main()
