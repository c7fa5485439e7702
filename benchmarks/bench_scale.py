"""How close is skmsif to its cost floor? Ratios measured side by side in one process.

Set-up (issue "Scale and speed"): Fashion-MNIST (Debian package ``dataset-fashion-mnist``),
the paper's Table A "MNIST" CNN, pretrain on classes 0-3 (m = 24,000), finetune a new head
on 5,000 examples of classes 4-9, embedding fixed (Case 1). Every timing below is printed
as a ratio to (a), measured in the same run, because this machine is shared and noisy:

  (a) one training epoch over Z (forward + backward, the same batch size);
  (b) the scoring pass over Z for one vector, and for 100 vectors;
  (c) ``score`` end to end (fit + score) for the whole test set, ``hessian="cg"``, the
      paper's dampings (1e-2, 1e-8) and Hessian subsample (1000);
  (d) the (1000, m) ``influence`` matrix with ``hessian="lowrank"`` (fit + influence),
      and the Pearson agreement of its summed scores with (c)'s;
  (e) a naive baseline that solves once per pretrain example (3 timed, extrapolated
      to m: each solve takes minutes on 2 cores, so 20 would take over an hour);
  (f) peak resident memory.

Targets on a 2-core CPU: (b, one vector) <= 2 (a); (c) <= 20 (a); (d) <= 5 (c) with
agreement >= 0.9; (e) / (c) >= 1000; (f) <= 3 GB.

Run::

    python benchmarks/bench_scale.py              # full size, about 10-20 minutes
    python benchmarks/bench_scale.py --size tiny  # seconds; what the smoke test runs

Threads are pinned (torch and BLAS) to ``--threads`` (default 2, the machine's cores).
The CNN and its Adam training come from the paper reproduction (``paper/models.py``,
``paper/training.py``), which this script finds in the repository.
"""

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: paper/


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of hessian='lowrank' (default: 50 full, 5 tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iter", type=int, default=None,
                        help="iterations per solve (default: 100 full, 20 tiny)")
    return parser.parse_args()


ARGS = _parse()
from _threads import pin_threads  # noqa: E402

pin_threads(ARGS.threads)  # before numpy, scipy and torch load

import torch  # noqa: E402
from scipy.stats import pearsonr  # noqa: E402

from paper.models import make_mnist_cnn  # noqa: E402
from paper.training import fit_adam  # noqa: E402
from skmsif import MultiStageInfluenceEstimator  # noqa: E402
from skmsif.datasets import fashion_mnist_available, fashion_mnist_split  # noqa: E402


SIZES = {
    # n_pretrain (None: all 24,000), n_finetune, n_test for (c), n_test for (d),
    # pretrain / finetune Adam steps, hessian_samples, naive solves timed
    "full": dict(n_pretrain=None, n_finetune=5000, n_test=None, n_matrix=1000,
                 pretrain_steps=300, finetune_steps=300, hessian_samples=1000, naive=3,
                 max_iter=100, rank=50),
    "tiny": dict(n_pretrain=300, n_finetune=200, n_test=40, n_matrix=20,
                 pretrain_steps=20, finetune_steps=20, hessian_samples=100, naive=1,
                 max_iter=20, rank=5),
}
BATCH_SIZE = 512


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main():
    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    size = SIZES[ARGS.size]
    rank = ARGS.rank or size["rank"]
    dtype = getattr(torch, ARGS.dtype)
    split = fashion_mnist_split(random_state=ARGS.seed, n_pretrain=size["n_pretrain"],
                                n_finetune=size["n_finetune"], n_test=size["n_test"])
    Z, X, x_test = split.Z, split.X, split.x_test
    m = len(Z[0])
    embedding, pretrain_model, finetune_model = make_mnist_cnn(seed=ARGS.seed, dtype=dtype)
    # Training is set-up, not measured: pretrain all, then the finetune head alone.
    fit_adam(pretrain_model, Z, n_steps=size["pretrain_steps"], batch_size=BATCH_SIZE,
             random_state=ARGS.seed)
    fit_adam(finetune_model, X, params=list(finetune_model[1].parameters()),
             n_steps=size["finetune_steps"], batch_size=BATCH_SIZE, random_state=ARGS.seed)
    print(f"Fashion-MNIST, Table A CNN, m = {m}, n = {len(X[0])}, test = {len(x_test[0])}, "
          f"{ARGS.dtype}, {ARGS.threads} threads, batch {BATCH_SIZE}")
    n_params = sum(p.numel() for p in pretrain_model.parameters())
    print(f"pretrain parameters {n_params}, finetune head "
          f"{sum(p.numel() for p in finetune_model[1].parameters())}")

    # (a) one epoch of training over Z.
    inputs = torch.as_tensor(Z[0]).to(dtype)
    targets = torch.as_tensor(Z[1])
    leaves = {name: parameter.detach().clone().requires_grad_()
              for name, parameter in pretrain_model.named_parameters()}

    def epoch():
        for start in range(0, m, BATCH_SIZE):
            outputs = torch.func.functional_call(pretrain_model, leaves,
                                                 (inputs[start:start + BATCH_SIZE],))
            loss = torch.nn.functional.cross_entropy(outputs,
                                                     targets[start:start + BATCH_SIZE])
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return grads

    epoch()  # warm-up
    t_epoch, _ = timed(epoch)
    rows = [("(a) training epoch over Z", t_epoch, 1.0, "")]

    common = dict(embedding="fixed", pretrain_damping=1e-2, finetune_damping=1e-8,
                  hessian_samples=size["hessian_samples"], random_state=ARGS.seed,
                  batch_size=BATCH_SIZE, dtype=ARGS.dtype,
                  max_iter=ARGS.max_iter or size["max_iter"])

    # (c) score end to end with CG.
    def cg_score():
        estimator = MultiStageInfluenceEstimator(hessian="cg", **common)
        estimator.fit(pretrain_model, finetune_model, Z, X)
        return estimator, estimator.score(x_test)

    # A solve that stops at max_iter warns; the benchmark reports its residual instead.
    warnings.simplefilter("ignore", category=UserWarning)
    t_cg, (cg_estimator, cg_scores) = timed(cg_score)

    # (b) the scoring pass for 1 and 100 vectors, on the fitted estimator (its private
    # fitted state: the pass itself, without the solves).
    state = cg_estimator._state
    p = state.pretrain.n_params
    generator = torch.Generator().manual_seed(ARGS.seed)
    for count in (1, 100):
        vectors = torch.randn(count, p, generator=generator, dtype=torch.float64)
        t_pass, _ = timed(lambda vectors=vectors: state.directional(vectors, state.Z))
        rows.append((f"(b) scoring pass over Z, {count} vector(s)", t_pass,
                     t_pass / t_epoch, "target <= 2 (a)" if count == 1 else ""))
    solves = {name: solver.history_[0] for name, solver in
              (("pretrain", cg_estimator.pretrain_solver_),
               ("finetune", cg_estimator.finetune_solver_))}
    rows.append(("(c) score, whole test set, hessian='cg'", t_cg, t_cg / t_epoch,
                 "target <= 20 (a); MINRES " + ", ".join(
                     f"{name} {entry['n_iter']} iterations, residual {entry['residual']:.1e}"
                     for name, entry in solves.items())
                 + f"; cached features {cg_estimator.features_cached_}"))

    # (d) the (n_matrix, m) influence matrix with the low-rank backend.
    matrix_test = (x_test[0][:size["n_matrix"]], x_test[1][:size["n_matrix"]])

    def lowrank_matrix():
        estimator = MultiStageInfluenceEstimator(hessian="lowrank", rank=rank, **common)
        estimator.fit(pretrain_model, finetune_model, Z, X)
        return estimator.influence(matrix_test)

    t_lowrank, matrix = timed(lowrank_matrix)
    cg_on_matrix_test = cg_estimator.score(matrix_test)
    agreement = pearsonr(matrix.sum(axis=0), cg_on_matrix_test)[0]
    rows.append((f"(d) ({len(matrix)}, m) influence, hessian='lowrank' rank {rank}",
                 t_lowrank, t_lowrank / t_epoch,
                 f"= {t_lowrank / t_cg:.2f} (c), target <= 5 (c); Pearson with CG on the "
                 f"summed scores {agreement:.3f} (target >= 0.9)"))

    # (e) naive: one pretrain solve per pretrain example, timed on a few, extrapolated.
    solver = cg_estimator.pretrain_solver_

    def naive(count):
        for index in range(count):
            batch = state.Z.subset(index, index + 1)
            gradient = state.pretrain.gradient_rows(batch, 1, state.device, summed=True)
            solver.solve(gradient)

    t_naive, _ = timed(lambda: naive(size["naive"]))
    t_naive_all = t_naive / size["naive"] * m
    rows.append((f"(e) naive, one solve per pretrain example ({size['naive']} timed, x m)",
                 t_naive_all, t_naive_all / t_epoch,
                 f"(e)/(c) = {t_naive_all / t_cg:.0f}, target >= 1000"))

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    width = max(len(row[0]) for row in rows)
    print(f"\n{'measurement'.ljust(width)}  {'seconds':>10}  {'ratio to (a)':>12}  notes")
    for name, seconds, ratio, note in rows:
        print(f"{name.ljust(width)}  {seconds:10.2f}  {ratio:12.2f}  {note}")
    print(f"(f) peak resident memory: {peak_gb:.2f} GB (target <= 3 GB)")


if __name__ == "__main__":
    main()
