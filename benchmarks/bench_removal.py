"""Removal effects against retraining: first order against 1, 2, 3 Newton steps.

Set-up (issue "What happens if I remove these examples?"): scikit-learn's 8x8 digits
(:func:`skmsif.datasets.load_digits_split`), pretrain on digits 0-3 (m = 720), finetune
on digits 4-9, a tiny float64 MLP (64 -> ``--hidden`` tanh -> a 4-class or a 6-class
softmax head), both stages trained with full-batch L-BFGS on exactly the objectives the
estimator describes, weakly regularised (L2 weights = the dampings, 1e-3 by default):

* pretrain: ``mean_j g(z_j) + (d_p / 2) ||(W, U)||^2``;
* finetune, ``--case fixed``: ``mean_i f(x_i) + (d_f / 2) ||Theta||^2``, ``W`` frozen;
  ``--case updated``: ``mean_i f(x_i) + (d_f / 2) ||(W, Theta)||^2
  + alpha ||W - W_bar||^2``.

Two kinds of removal, each predicted with ``est.removal_effect(x_test, indices,
newton_steps=k)`` for ``k = 0`` (first order, ``-I/m``) and ``k = 1, 2, 3``:

* singles: the ``--n-single`` examples of largest ``|I|`` and as many random ones
  (:func:`skmsif.validation.audit_indices`); the truth is
  :func:`skmsif.validation.leave_one_out` (``recipe="converged"``), with a ``pretrain_fn``
  that minimises the mean loss over the remaining ``m - 1`` examples plus
  ``(d_p / 2) ||.||^2`` (the objective ``removal_effect`` takes Newton steps on;
  ``leave_one_out``'s own pretrain stage keeps the normalisation ``1/m``);
* groups of ``--group-size`` removed together: ``--n-groups`` random disjoint groups and
  as many blocks of consecutive examples in the order of ``I`` (half from the most
  harmful end, half from the most helpful); the truth retrains both stages the same
  way (this script's ``retrain_group``).

Every training and retraining minimises its stage's objective exactly: full-batch L-BFGS
from the weights it starts with, then dense Newton steps that descend, to a largest
gradient entry of 1e-11 at a point where the Hessian is positive definite (a minimum;
checked, and reported on the "truth" line).

Each row: Pearson and Spearman correlation and mean relative error
``mean |predicted - actual| / |actual|`` against the retrained changes, and the CPU
seconds per entry of ``removal_effect``, measured serially on ``--n-timed`` entries (CPU
time, so that other work on the machine does not change it). Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_removal.py            # 27 min on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/bench_removal.py --size tiny  # seconds (smoke)

Threads: torch and BLAS pinned to ``--threads`` (default 1); entries and retrains run on
``--n-jobs`` joblib workers (default 2), one torch thread each.
"""

import argparse
import copy
import functools
import time
import warnings


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["fixed", "updated", "both"], default="both")
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--pretrain-damping", type=float, default=1e-3)
    parser.add_argument("--finetune-damping", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--n-single", type=int, default=None,
                        help="top and random singles each (default 30 full, 3 tiny)")
    parser.add_argument("--n-groups", type=int, default=None,
                        help="random and ranked groups each (default 10 full, 2 tiny)")
    parser.add_argument("--group-size", type=int, default=25)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--n-timed", type=int, default=4,
                        help="entries timed serially for the CPU seconds per entry")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


ARGS = _parse()
from _threads import pin_threads  # noqa: E402

pin_threads(ARGS.threads)  # before numpy, scipy and torch load

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.base import clone  # noqa: E402
from torch import nn  # noqa: E402

from skmsif import MultiStageInfluenceEstimator  # noqa: E402
from skmsif.datasets import load_digits_split  # noqa: E402
from skmsif.validation import audit_indices, faithfulness, leave_one_out  # noqa: E402

TOL = 1e-11  # every training: largest gradient entry at the end


def cross_entropy(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def make_models(case, hidden, seed):
    """A tiny MLP: shared tanh embedding, a 4-class pretrain head, a 6-class one."""
    torch.manual_seed(seed)
    embedding = nn.Sequential(nn.Linear(64, hidden), nn.Tanh())
    pretrain_model = nn.Sequential(embedding, nn.Linear(hidden, 4)).double()
    finetune_embedding = embedding if case == "fixed" else copy.deepcopy(embedding)
    finetune_model = nn.Sequential(finetune_embedding, nn.Linear(hidden, 6)).double()
    return pretrain_model, finetune_model


def _objective(model, names, data, damping, anchors, alpha):
    """``mean loss + (damping/2)||params||^2 + alpha sum ||W - W_bar||^2`` of a flat vector
    of the parameters ``names`` (the others fixed at the model's values)."""
    fixed = {name: t.detach() for name, t in model.state_dict().items()}
    shapes = [fixed[name].shape for name in names]
    sizes = [fixed[name].numel() for name in names]
    inputs, targets = data

    def value(flat):
        values = dict(zip(names, (piece.reshape(shape) for piece, shape in
                                  zip(torch.split(flat, sizes), shapes))))
        outputs = torch.func.functional_call(model, {**fixed, **values}, (inputs,))
        total = cross_entropy(outputs, targets).mean() + damping / 2 * (flat * flat).sum()
        for name, bar in anchors.items():
            total = total + alpha * ((values[name] - bar) ** 2).sum()
        return total

    return value, torch.cat([fixed[name].reshape(-1) for name in names])


def fit_exactly(model, names, data, damping, anchors=None, alpha=0.0, tol=1e-12):
    """Minimise the stage objective over ``names`` to a largest gradient entry ``tol``:
    full-batch L-BFGS (a descent method, from the weights the model holds), then Newton
    steps with the dense Hessian while they descend and shrink the gradient; rounds of
    both until ``tol``. The model's parameters are updated in place.

    Returns the largest gradient entry, or infinity when the point reached is not a
    minimum (the Hessian there is not positive definite).
    """
    anchors = anchors or {}
    params = dict(model.named_parameters())
    value, flat = _objective(model, names, data, damping, anchors, alpha)
    flat = flat.clone()
    for _ in range(10):
        flat = flat.requires_grad_(True)
        optimizer = torch.optim.LBFGS([flat], lr=1, max_iter=1000, tolerance_grad=tol,
                                      tolerance_change=0, history_size=50,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = value(flat)
            loss.backward()
            return loss

        optimizer.step(closure)
        flat = flat.detach()
        gradient = torch.func.grad(value)(flat)
        for _ in range(30):
            if float(gradient.abs().max()) <= tol:
                break
            step = torch.linalg.solve(torch.func.hessian(value)(flat), gradient)
            new_gradient = torch.func.grad(value)(flat - step)
            before, after = float(value(flat)), float(value(flat - step))
            if not (new_gradient.abs().max() < gradient.abs().max()
                    and after <= before + 1e-13 * abs(before)):
                break
            flat, gradient = flat - step, new_gradient
        if float(gradient.abs().max()) <= tol:
            break
    with torch.no_grad():
        offset = 0
        for name in names:
            size = params[name].numel()
            params[name].copy_(flat[offset:offset + size].reshape(params[name].shape))
            offset += size
    if float(torch.linalg.eigvalsh(torch.func.hessian(value)(flat))[0]) <= 0:
        return float("inf")
    return float(gradient.abs().max())


def _names(module, prefix):
    return [f"{prefix}.{name}" for name, _ in module.named_parameters()]


def train_stages(case, pretrain_model, finetune_model, Z, X):
    """Both stages to their optimum, in place; returns the largest gradient entries."""
    pre_grad = fit_exactly(pretrain_model, [n for n, _ in pretrain_model.named_parameters()],
                           Z, ARGS.pretrain_damping)
    return pre_grad, finetune_stage(case, finetune_model, X, pretrain_model)


def finetune_stage(case, finetune_model, X, pretrain_model):
    if case == "fixed":  # the embedding is the pretrain model's (one object)
        return fit_exactly(finetune_model, _names(finetune_model[1], "1"), X,
                           ARGS.finetune_damping)
    anchors = {f"0.{name}": p.detach().clone()
               for name, p in pretrain_model[0].named_parameters()}
    return fit_exactly(finetune_model, [n for n, _ in finetune_model.named_parameters()],
                       X, ARGS.finetune_damping, anchors, ARGS.alpha)


def train(case, Z, X):
    pretrain_model, finetune_model = make_models(case, ARGS.hidden, ARGS.seed)
    if case == "updated":  # finetuning starts from the pretrained embedding
        fit_exactly(pretrain_model, [n for n, _ in pretrain_model.named_parameters()], Z,
                    ARGS.pretrain_damping)
        finetune_model[0].load_state_dict(pretrain_model[0].state_dict())
    pre_grad, fin_grad = train_stages(case, pretrain_model, finetune_model, Z, X)
    return pretrain_model, finetune_model, pre_grad, fin_grad


def _converged(gradient, stage):
    if not gradient <= TOL:
        raise RuntimeError(f"a {stage} retrain stopped at a gradient entry {gradient:.2g}")


def pretrain_fn(model, Z):
    """``leave_one_out``'s pretrain stage: the mean over the examples it is given."""
    _converged(fit_exactly(model, [n for n, _ in model.named_parameters()], Z,
                           ARGS.pretrain_damping), "pretrain")


def finetune_fn(case, model, X, pretrain_model):
    """``leave_one_out``'s finetune stage, solved as exactly as the pretrain one."""
    _converged(finetune_stage(case, model, X, pretrain_model), "finetune")


def retrain_group(case, pretrain_model, finetune_model, Z, X, x_test, group):
    """Summed test loss after both stages are retrained without ``group``."""
    torch.set_num_threads(1)  # as leave_one_out's retrains: one thread each
    pretrain_model, finetune_model = copy.deepcopy((pretrain_model, finetune_model))
    keep = torch.ones(len(Z[1]), dtype=torch.bool)
    keep[torch.as_tensor(group, dtype=torch.long)] = False
    pre_grad, fin_grad = train_stages(case, pretrain_model, finetune_model,
                                      (Z[0][keep], Z[1][keep]), X)
    with torch.no_grad():
        loss = float(cross_entropy(finetune_model(x_test[0]), x_test[1]).sum())
    return loss, max(pre_grad, fin_grad) <= TOL


def metrics(predicted, actual):
    result = faithfulness(predicted, actual)["all"]
    result["rel_err"] = float(np.mean(np.abs(predicted - actual) / np.abs(actual)))
    return result


def run_case(case, data):
    Z, X, x_test = data
    m = len(Z[1])
    start = time.time()
    pretrain_model, finetune_model, pre_grad, fin_grad = train(case, Z, X)
    print(f"\n## embedding={case!r}: m={m}, n={len(X[1])}, n_test={len(x_test[1])}, "
          f"hidden={ARGS.hidden}, dampings ({ARGS.pretrain_damping:g}, "
          f"{ARGS.finetune_damping:g})" + (f", alpha={ARGS.alpha:g}" if case == "updated"
                                           else ""))
    print(f"trained in {time.time() - start:.1f} s; largest gradient entry: pretrain "
          f"{pre_grad:.1e}, finetune {fin_grad:.1e}")
    shared = None if case == "fixed" else "0"
    est = MultiStageInfluenceEstimator(
        embedding=case, alpha=ARGS.alpha, hessian="exact",
        pretrain_damping=ARGS.pretrain_damping, finetune_damping=ARGS.finetune_damping,
        shared=shared, n_jobs=ARGS.n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a StationarityWarning at 1e-10 is expected noise
        est.fit(pretrain_model, finetune_model, Z, X)
    scores = est.score(x_test)

    # Singles: top |I| and random, truth by leave_one_out.
    audit = audit_indices(scores, n_top=ARGS.n_single, n_random=ARGS.n_single,
                          random_state=ARGS.seed)
    start = time.time()
    single_truth, info = leave_one_out(
        pretrain_model, finetune_model, Z, X, x_test, audit.indices, embedding=case,
        alpha=ARGS.alpha, shared=shared, pretrain_damping=ARGS.pretrain_damping,
        finetune_damping=ARGS.finetune_damping, pretrain_fn=pretrain_fn,
        finetune_fn=functools.partial(finetune_fn, case), n_jobs=ARGS.n_jobs, return_info=True)
    single_time = time.time() - start

    # Groups: random disjoint ones, and blocks of the ranking by I.
    rng = np.random.RandomState(ARGS.seed)
    size = ARGS.group_size
    permutation = rng.permutation(m)
    groups = [np.sort(permutation[k * size:(k + 1) * size]) for k in range(ARGS.n_groups)]
    order = np.argsort(-scores, kind="stable")  # most harmful first
    half = ARGS.n_groups // 2
    groups += [np.sort(order[k * size:(k + 1) * size]) for k in range(half)]
    groups += [np.sort(order[m - (k + 1) * size:m - k * size])
               for k in range(ARGS.n_groups - half)]
    start = time.time()
    jobs = [None] + groups
    results = joblib.Parallel(n_jobs=ARGS.n_jobs)(
        joblib.delayed(retrain_group)(case, pretrain_model, finetune_model, Z, X, x_test,
                                      [] if group is None else group)
        for group in jobs)
    group_time = time.time() - start
    reference = results[0][0]
    group_truth = np.array([loss - reference for loss, _ in results[1:]])
    converged = all(ok for _, ok in results)
    del info  # custom stages report no gradients; retrain_group checks the same ones
    print(f"truth: {len(audit.indices)} single retrains in {single_time:.0f} s, "
          f"{len(groups)} group retrains (+ reference) in {group_time:.0f} s; all "
          f"converged to {TOL:g}: {bool(converged)}")

    # CPU time per entry, measured serially (one process, one thread) on a few entries:
    # unlike wall-clock time it does not depend on what else runs on the machine.
    serial = clone(est).set_params(n_jobs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial.fit(pretrain_model, finetune_model, Z, X)
    rows = []
    for kind, indices, truth in (("singles", audit.indices, single_truth),
                                 (f"groups of {size}", [g.tolist() for g in groups],
                                  group_truth)):
        for steps in range(ARGS.max_steps + 1):
            predicted = est.removal_effect(x_test, indices, newton_steps=steps)
            timed = indices[:ARGS.n_timed]
            start = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported by the call above
                serial.removal_effect(x_test, timed, newton_steps=steps)
            seconds = (time.process_time() - start) / len(timed)
            rows.append((kind, steps, metrics(predicted, truth), seconds, len(indices)))
    print()
    print("| removal | n | method | Pearson | Spearman | mean rel. error | "
          "CPU s / entry |")
    print("|---|---|---|---|---|---|---|")
    for kind, steps, result, seconds, count in rows:
        method = "first order (-I/m)" if steps == 0 else f"{steps} Newton step" + (
            "s" if steps > 1 else "")
        print(f"| {kind} | {count} | {method} | {result['pearson']:.4f} | "
              f"{result['spearman']:.4f} | {result['rel_err']:.3g} | {seconds:.3g} |")
    return rows


def main():
    if ARGS.size == "tiny":
        ARGS.n_single = ARGS.n_single or 3
        ARGS.n_groups = ARGS.n_groups or 2
        ARGS.max_steps = min(ARGS.max_steps, 1)
        data = load_digits_split(random_state=ARGS.seed, n_pretrain=120, n_finetune=100,
                                 n_test=60)
        ARGS.group_size = min(ARGS.group_size, 10)
    else:
        ARGS.n_single = ARGS.n_single or 30
        ARGS.n_groups = ARGS.n_groups or 10
        data = load_digits_split(random_state=ARGS.seed)
    tensors = tuple(tuple(torch.as_tensor(a) for a in pair)
                    for pair in (data.Z, data.X, data.x_test))
    print(f"torch {torch.__version__}, {ARGS.threads} thread(s), n_jobs={ARGS.n_jobs}")
    cases = ["fixed", "updated"] if ARGS.case == "both" else [ARGS.case]
    for case in cases:
        run_case(case, tensors)


if __name__ == "__main__":
    main()
