"""Leave-one-out retraining of the text problem, in the paper's protocol (Sec. 4.1, App. B).

``skmsif.validation.leave_one_out`` takes ``(inputs, targets)`` tensor pairs only; this is
the minimal recipe for dict data and ``transformers`` models. For a group ``S`` of pretrain
examples (one index for leave-one-out):

1. pretrain stage: ``pretrain_steps`` Adam steps (constant ``lr``) on the pretrain
   objective, warm-started from the trained weights, on minibatches in a fixed order
   (seeded by ``random_state``, the same for every retrain); the examples of ``S`` keep
   their place in the order with weight zero, so that every other example is seen at
   the same steps with the same weights;
2. finetune stage on the unchanged ``X``, warm-started from the finetuned weights:
   ``"fixed"``: the new head on the retrained encoder's features, by L-BFGS to a
   gradient of ``head_tol`` (its objective is convex: this is its exact minimiser);
   ``"updated"``: ``finetune_steps`` Adam steps on all finetune parameters with
   ``alpha ||W - W_bar||^2``, ``W_bar`` the retrained pretrain encoder, in a fixed
   minibatch order;
3. the summed cross-entropy over ``x_test``.

The reference ("with" ``S``) is the same retraining with nothing removed, so that what
the steps do anyway (drift from a not exactly stationary point, minibatch noise) cancels
in the difference. Everything runs in float64, eval mode, one torch thread per retrain:
results do not depend on ``n_jobs``.
"""

import copy
import time
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.utils import Bunch

from . import _models, _training
from ._problem import _head_objective

HEAD_TOL = 1e-10
HEAD_MAX_ITER = 500


def _groups(indices, m):
    """``indices`` as a list of tuples of ints (one group per retrain), checked."""
    groups = []
    for item in indices:
        group = (item,) if isinstance(item, (Integral, np.integer)) else tuple(item)
        for i in group:
            if not isinstance(i, (Integral, np.integer)) or isinstance(i, bool):
                raise TypeError(f"indices must hold ints or sequences of ints; got {i!r}.")
            if not 0 <= int(i) < m:
                raise ValueError(f"index {int(i)} is out of range: Z has {m} examples.")
        groups.append(tuple(sorted({int(i) for i in group})))
    return groups


def _retrain(models, Z, X, x_test, removed, settings):
    """One retrain without the examples ``removed``; returns the test loss and more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        pretrain_model, finetune_model = copy.deepcopy(models)  # keeps Case 1's sharing
        pretrain_model.double().eval()
        finetune_model.double().eval()
        weights = torch.ones(len(Z["labels"]), dtype=torch.float64)
        weights[list(removed)] = 0.0
        pre_params = list(pretrain_model.parameters())
        before = [p.detach().clone() for p in pre_params]
        objective = _training.Objective(pretrain_model, pre_params, Z,
                                        damping=settings["pretrain_damping"], weights=weights)
        _training.run_adam(objective, settings["pretrain_steps"], settings["lr"],
                           settings["batch_size"], seed=settings["random_state"])
        pretrain_distance = float(sum(((p.detach() - b) ** 2).sum()
                                      for p, b in zip(pre_params, before)) ** 0.5)

        if settings["case"] == "fixed":
            # finetune_model.bert is pretrain_model.bert: it already holds the retrained W
            head = _head_objective(finetune_model, X, damping=settings["finetune_damping"])
            info = _training.run_lbfgs(head, HEAD_MAX_ITER, HEAD_TOL)
            finetune_grad_max = info["grad_max"]
        else:
            anchors = list(zip(_models.encoder_parameters(finetune_model),
                               [p.detach() for p in _models.encoder_parameters(pretrain_model)]))
            objective = _training.Objective(
                finetune_model, list(finetune_model.parameters()), X,
                damping=settings["finetune_damping"], anchors=anchors, alpha=settings["alpha"])
            _training.run_adam(objective, settings["finetune_steps"], settings["lr"],
                               settings["batch_size"], seed=settings["random_state"] + 1)
            finetune_grad_max = float("nan")
        loss = float(np.sum(_training.per_example_loss(finetune_model, x_test)))
        return {"loss": loss, "pretrain_distance": pretrain_distance,
                "finetune_grad_max": finetune_grad_max,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start}
    finally:
        torch.set_num_threads(previous)


def retrain_without(problem, indices, *, pretrain_steps=None, finetune_steps=None, lr=None,
                    batch_size=None, random_state=0, n_jobs=None, return_info=False):
    """Actual change of the summed test loss when pretrain examples are removed.

    Parameters
    ----------
    problem : sklearn.utils.Bunch
        From :func:`paper.text.make_problem`. Not modified.
    indices : sequence
        One retrain per entry: an int (leave that example of ``Z`` out) or a sequence of
        ints (leave the group out; an empty sequence removes nothing and gives a change
        of exactly 0).
    pretrain_steps, finetune_steps, lr, batch_size : optional
        The paper's ``T'_pretrain``, ``T'_finetune`` (Case 2 only), Adam's learning rate
        and the minibatch size; ``None`` takes ``problem.retrain_params``.
    random_state : int, default=0
        Seeds the minibatch order (the same for every retrain of the call).
    n_jobs : int, default=None
        Retrains in parallel with joblib (``None``: one at a time); each uses one torch
        thread, so results do not depend on ``n_jobs``.
    return_info : bool, default=False
        Also return a Bunch of per-retrain diagnostics.

    Returns
    -------
    change : ndarray of shape (len(indices),)
        ``L(without) - L(with)``, ``L`` the summed cross-entropy over ``problem.x_test``
        after the same retraining (with: nothing removed). Compare with ``-I / m`` of the
        estimator (``I > 0``: harmful).
    info : sklearn.utils.Bunch
        With ``return_info=True``: ``loss``, ``pretrain_distance`` (how far the pretrain
        steps moved the weights), ``seconds`` and ``cpu_seconds`` (wall and CPU time;
        arrays over ``indices``) and
        ``reference`` (a dict of the same for the reference retrain), plus the
        ``settings`` used.
    """
    m = len(problem.Z["labels"])
    groups = _groups(indices, m)
    given = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "lr": lr,
             "batch_size": batch_size}
    settings = {key: problem.retrain_params[key] if value is None else value
                for key, value in given.items()}
    settings.update(case=problem.case, pretrain_damping=problem.pretrain_damping,
                    finetune_damping=problem.finetune_damping, alpha=problem.alpha,
                    random_state=int(random_state))
    for key, kind in (("pretrain_steps", int), ("finetune_steps", int), ("lr", float),
                      ("batch_size", int)):
        settings[key] = kind(settings[key])
    models = (problem.pretrain_model, problem.finetune_model)
    tasks = [()] + groups
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_retrain)(models, problem.Z, problem.X, problem.x_test, removed,
                                 settings)
        for removed in tasks)
    reference, results = results[0], results[1:]
    change = np.array([r["loss"] - reference["loss"] for r in results])
    if not return_info:
        return change
    info = Bunch(settings=settings, reference=reference,
                 **{key: np.array([r[key] for r in results])
                    for key in ("loss", "pretrain_distance", "seconds", "cpu_seconds")})
    return change, info
