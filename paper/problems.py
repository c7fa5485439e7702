"""Trained pretrain/finetune problems of the figures, one per data set, size and case.

A problem is a :class:`sklearn.utils.Bunch` with the trained ``pretrain_model`` and
``finetune_model``, the data ``Z``, ``X``, ``x_test`` (numpy ``(inputs, targets)``
pairs), ``estimator_params`` for :class:`~skmsif.MultiStageInfluenceEstimator` and
``loo_params`` for :func:`skmsif.validation.leave_one_out`, which retrain on exactly the
objectives the models were trained on.
"""

import copy
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.utils import Bunch

from skmsif import datasets

from .models import make_digits_mlp, make_mnist_cnn
from .training import accuracy, fit_adam, fit_lbfgs

# Hyper-parameters per (dataset, size). "converged": both stages are trained (and
# retrained for leave-one-out) to tight optima of their L2-regularised objectives, the
# L2 weights being the estimator's dampings. "paper": Adam minibatch training, and
# leave-one-out retrains of T' Adam steps from the trained weights (paper Appendix B).
CONFIGS = {
    ("digits", "full"): {
        "recipe": "converged", "hidden": 16, "n_pretrain": None, "n_finetune": None,
        "n_test": None, "n_top": 30, "n_random": 30, "pretrain_damping": 1e-2,
        "finetune_damping": 3e-2, "alpha": 0.1, "hessian": "exact",
        "hessian_samples": None, "task_size": 180, "small_finetune": 120,
        "n_explained": 4, "n_shown": 5,
    },
    ("digits", "tiny"): {
        "recipe": "converged", "hidden": 4, "n_pretrain": 100, "n_finetune": 60,
        "n_test": 40, "n_top": 5, "n_random": 5, "pretrain_damping": 1e-2,
        "finetune_damping": 3e-2, "alpha": 0.1, "hessian": "exact",
        "hessian_samples": None, "task_size": 30, "small_finetune": 20,
        "n_explained": 2, "n_shown": 3,
    },
    ("fashion-mnist", "full"): {
        "recipe": "paper", "n_pretrain": None, "n_finetune": 5000, "n_test": None,
        "n_top": 10, "n_random": 4, "pretrain_damping": 1e-2, "finetune_damping": 1e-8,
        "alpha": 0.01, "hessian": "cg", "hessian_samples": 100, "tol": 1e-4,
        "max_iter": 100, "estimator_dtype": "float32", "lr": 1e-3, "batch_size": 512,
        "pretrain_steps": 250, "finetune_steps": 300, "loo_steps": 100, "loo_lr": 1e-4,
        "task_size": 2000,
        "small_finetune": 1000, "n_explained": 4, "n_shown": 5,
    },
    ("fashion-mnist", "tiny"): {
        "recipe": "paper", "n_pretrain": 300, "n_finetune": 100, "n_test": 60,
        "n_top": 3, "n_random": 3, "pretrain_damping": 1e-2, "finetune_damping": 1e-8,
        "alpha": 0.01, "hessian": "cg", "hessian_samples": 50, "tol": 1e-3,
        "max_iter": 20, "estimator_dtype": "float32", "lr": 1e-3, "batch_size": 64,
        "pretrain_steps": 30, "finetune_steps": 20, "loo_steps": 3, "loo_lr": 1e-4, "task_size": 40,
        "small_finetune": 40, "n_explained": 2, "n_shown": 3,
    },
}

DATASETS = ("digits", "fashion-mnist")
SIZES = ("tiny", "full")


def config(dataset, size):
    """The hyper-parameters of ``(dataset, size)``, checked."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}.")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}.")
    return dict(CONFIGS[dataset, size])


def load(dataset, size, random_state=0, **overrides):
    """The data split of ``(dataset, size)``: a Bunch with ``Z``, ``X``, ``x_test``..."""
    cfg = config(dataset, size)
    sizes = {"n_pretrain": cfg["n_pretrain"], "n_finetune": cfg["n_finetune"],
             "n_test": cfg["n_test"]}
    sizes.update(overrides)
    if dataset == "digits":
        return datasets.load_digits_split(random_state, **sizes)
    return datasets.fashion_mnist_split(random_state, **sizes)


def _models(dataset, cfg, n_pretrain_classes, n_finetune_classes, seed):
    if dataset == "digits":
        return make_digits_mlp(cfg["hidden"], n_pretrain_classes=n_pretrain_classes,
                               n_finetune_classes=n_finetune_classes, seed=seed)
    return make_mnist_cnn(n_pretrain_classes, n_finetune_classes, seed)


def _train(model, data, cfg, stage, n_steps=None, **kwargs):
    damping = cfg[f"{stage}_damping"]
    if cfg["recipe"] == "converged":
        info = fit_lbfgs(model, data, damping=damping, tol=1e-8, max_iter=5000, **kwargs)
        return {"grad_max": info["grad_max"], "n_iter": info["n_iter"]}
    steps = cfg[f"{stage}_steps"] if n_steps is None else n_steps
    info = fit_adam(model, data, damping=damping, n_steps=steps,
                    batch_size=cfg["batch_size"], lr=cfg["lr"], random_state=0, **kwargs)
    return {"n_steps": info["n_steps"], "last_loss": info["last_loss"]}


def pretrain(dataset, size, data, seed=0, cache_dir=None):
    """Train the pretrain model on ``data.Z``; returns ``(embedding, model, info)``.

    With ``cache_dir``, the trained weights are saved there and reused (Fashion-MNIST
    pretraining takes minutes).
    """
    cfg = config(dataset, size)
    n_classes = len(data.pretrain_classes)
    embedding, model, _ = _models(dataset, cfg, n_classes, 1, seed)
    path = None
    if cache_dir is not None:
        digest = datasets_digest(data.Z)
        path = Path(cache_dir) / f"pretrain-{dataset}-{size}-{seed}-{digest}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            return embedding, model, {**saved["info"], "from_cache": True}
    start = time.perf_counter()
    info = _train(model, data.Z, cfg, "pretrain")
    info["seconds"] = time.perf_counter() - start
    info["accuracy"] = accuracy(model, data.Z)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path)
    return embedding, model, info


def datasets_digest(pair):
    """A short content hash of an ``(inputs, targets)`` pair."""
    import joblib

    return joblib.hash((np.asarray(pair[0]), np.asarray(pair[1])))[:12]


def finetune(dataset, size, embedding, pretrain_model, X, n_classes, case="fixed", seed=0,
             n_steps=None):
    """A finetune model on ``X``, from the pretrained ``embedding``; returns ``(model, info)``.

    ``case="fixed"`` (Case 1): the finetune model holds the *same* embedding object and
    only its new head is trained. ``"updated"`` (Case 2): it holds a copy of the
    embedding under the name prefix ``"0"``, and both are trained with the proximity term
    ``alpha ||W - W_pretrained||^2``.
    """
    cfg = config(dataset, size)
    _, _, template = _models(dataset, cfg, 1, n_classes, seed + 1)
    head = template[1]
    start = time.perf_counter()
    if case == "fixed":
        model = torch.nn.Sequential(embedding, head)
        info = _train(model, X, cfg, "finetune", n_steps, params=head.parameters())
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = torch.nn.Sequential(copy.deepcopy(embedding), head)
        anchors = list(zip(model[0].parameters(), embedding.parameters()))
        info = _train(model, X, cfg, "finetune", n_steps, anchors=anchors,
                      alpha=cfg["alpha"])
    for p in pretrain_model.parameters():
        p.requires_grad_(True)
    info["seconds"] = time.perf_counter() - start
    info["train_accuracy"] = accuracy(model, X)
    return model, info


def estimator_params(cfg, case):
    """Keyword arguments of :class:`~skmsif.MultiStageInfluenceEstimator`."""
    params = {"embedding": case, "hessian": cfg["hessian"],
              "pretrain_damping": cfg["pretrain_damping"],
              "finetune_damping": cfg["finetune_damping"],
              "hessian_samples": cfg["hessian_samples"], "random_state": 0}
    if case == "updated":
        params.update(alpha=cfg["alpha"], shared="0")
    if cfg["hessian"] == "cg":
        params.update(tol=cfg["tol"], max_iter=cfg["max_iter"], dtype=cfg["estimator_dtype"])
    return params


def loo_params(cfg, case, n_jobs=None):
    """Keyword arguments of :func:`skmsif.validation.leave_one_out`."""
    params = {"embedding": case, "pretrain_damping": cfg["pretrain_damping"],
              "finetune_damping": cfg["finetune_damping"], "recipe": cfg["recipe"],
              "n_jobs": n_jobs}
    if case == "updated":
        params.update(alpha=cfg["alpha"], shared="0")
    if cfg["recipe"] == "converged":
        params.update(max_iter=3000)
    if cfg["recipe"] == "paper":
        params.update(n_steps=cfg["loo_steps"], lr=cfg["loo_lr"],
                      batch_size=cfg["batch_size"], random_state=0, dtype="float32")
    return params


def problem(dataset, size, case="fixed", random_state=0, cache_dir=None, n_jobs=None):
    """Data, trained models and settings of the correlation experiments (Figs. 2, 4, 5)."""
    cfg = config(dataset, size)
    data = load(dataset, size, random_state)
    embedding, pretrain_model, pretrain_info = pretrain(dataset, size, data,
                                                        cache_dir=cache_dir)
    finetune_model, finetune_info = finetune(dataset, size, embedding, pretrain_model, data.X,
                                             len(data.finetune_classes), case)
    return Bunch(
        dataset=dataset, size=size, case=case, config=cfg, data=data,
        pretrain_model=pretrain_model, finetune_model=finetune_model, embedding=embedding,
        Z=data.Z, X=data.X, x_test=data.x_test,
        estimator_params=estimator_params(cfg, case),
        loo_params=loo_params(cfg, case, n_jobs),
        training={"pretrain": pretrain_info, "finetune": finetune_info,
                  "test_accuracy": accuracy(finetune_model, data.x_test)},
    )
