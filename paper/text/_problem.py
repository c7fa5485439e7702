"""The trained two-stage text problem: data, both models, settings, diagnostics."""

import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import joblib
import numpy as np
import torch
import transformers
from sklearn.utils import Bunch

from . import _data, _models, _training

# Bump when a change of the code changes the trained weights: cached weights of older
# versions are then ignored.
CODE_VERSION = 1

# Hyper-parameters per size. Dampings are the L2 weights of the training objectives,
# hence the dampings to give the estimator.
CONFIGS = {
    "full": {
        # data
        "n_pretrain": 2000, "n_pretrain_test": 600, "n_finetune": 500, "n_test": 200,
        "max_length": 32, "min_frequency": 5,
        # model
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "layer_norm_eps": 1.0,
        # objectives
        "pretrain_damping": 1e-2, "finetune_damping": 1e-3, "alpha": 1e-2,
        # pretrain training: Adam without, then with the L2 term, then L-BFGS
        "batch_size": 64, "lr": 3e-3, "warmup_epochs": 8, "anneal_epochs": 20,
        "pretrain_lbfgs_iter": 300, "finetune_epochs": 10, "finetune_lbfgs_iter": 300,
        "lbfgs_dtype": "float32", "newton_steps": 0, "tol": 1e-6, "head_tol": 1e-10,
        # leave-one-out retraining (paper protocol: T' Adam steps from the trained weights)
        "retrain_pretrain_steps": 100, "retrain_finetune_steps": 50, "retrain_lr": 1e-4,
        "retrain_batch_size": 64,
    },
    "tiny": {
        "n_pretrain": 60, "n_pretrain_test": 30, "n_finetune": 30, "n_test": 20,
        "max_length": 16, "min_frequency": 2,
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "layer_norm_eps": 1.0,
        "pretrain_damping": 1e-2, "finetune_damping": 1e-3, "alpha": 1e-2,
        "batch_size": 16, "lr": 1e-2, "warmup_epochs": 40, "anneal_epochs": 20,
        "pretrain_lbfgs_iter": 800, "finetune_epochs": 5, "finetune_lbfgs_iter": 300,
        "lbfgs_dtype": "float64", "newton_steps": 10, "tol": 1e-8, "head_tol": 1e-10,
        "retrain_pretrain_steps": 10, "retrain_finetune_steps": 10, "retrain_lr": 1e-4,
        "retrain_batch_size": 16,
    },
}
SIZES = tuple(CONFIGS)
CASES = ("fixed", "updated")
# How many epochs the L2 weight takes to reach its full value after the warm-up.
DAMPING_RAMP_EPOCHS = 5


def config(size):
    """The hyper-parameters of ``size`` (a copy)."""
    if size not in CONFIGS:
        raise ValueError(f"size={size!r} is not one of {SIZES}.")
    return dict(CONFIGS[size])


def default_cache_dir():
    """Where trained weights are kept unless told otherwise: ``$SKMSIF_CACHE/paper-text``
    or, without that variable, ``<temp dir>/skmsif-cache/paper-text``."""
    root = os.environ.get("SKMSIF_CACHE") or os.path.join(tempfile.gettempdir(),
                                                           "skmsif-cache")
    return Path(root) / "paper-text"


@lru_cache(maxsize=1)
def _tweets():
    return _data.load_tweets()


def load_data(size="full", random_state=0):
    """The tokenised data of the problem (no model): a Bunch, see :func:`make_problem`."""
    cfg = config(size)
    tweets = _tweets()
    rows = _data.split(tweets, cfg["n_pretrain"], cfg["n_pretrain_test"], cfg["n_finetune"],
                       cfg["n_test"], random_state)
    tokenizer = _data.build_tokenizer(tweets.model_text[rows.Z], cfg["max_length"],
                                      cfg["min_frequency"])

    def encode(which, labels):
        index = rows[which]
        return _data.encode(tokenizer, tweets.model_text[index], tweets.sentiment[index],
                            labels, cfg["max_length"])

    return Bunch(
        Z=encode("Z", _data.PRETRAIN_LABELS), Z_test=encode("Z_test", _data.PRETRAIN_LABELS),
        X=encode("X", _data.FINETUNE_LABELS), x_test=encode("x_test", _data.FINETUNE_LABELS),
        Z_text=list(tweets.text[rows.Z]), X_text=list(tweets.text[rows.X]),
        x_test_text=list(tweets.text[rows.x_test]),
        X_topic=list(tweets.topic[rows.X]), x_test_topic=list(tweets.topic[rows.x_test]),
        pretrain_labels=_data.PRETRAIN_LABELS, finetune_labels=_data.FINETUNE_LABELS,
        tokenizer=tokenizer, rows=rows,
    )


# --------------------------------------------------------------------------- training


def _stage_report(objective, params_by_part):
    """Gradient norms of ``objective``, overall and per part (``{"encoder": [...], ...}``)."""
    value, grad = objective.gradient()
    report = {"objective": value, "grad_max": float(grad.abs().max()),
              "grad_norm": float(grad.norm())}
    offsets, start = {}, 0
    for p in objective.params:
        offsets[id(p)] = (start, start + p.numel())
        start += p.numel()
    for part, params in params_by_part.items():
        pieces = [grad[slice(*offsets[id(p)])] for p in params if id(p) in offsets]
        if pieces:
            report[f"{part}_grad_max"] = float(torch.cat(pieces).abs().max())
    return report


def _head_objective(model, data, *, damping):
    """The head's objective on fixed encoder outputs (the pooled ``[CLS]`` features)."""
    with torch.no_grad():
        features = torch.cat([
            model.bert(**_training.model_inputs(data, slice(s, s + _training.CHUNK))).pooler_output
            for s in range(0, len(data["labels"]), _training.CHUNK)])
    head_data = _training.HeadData(features, data["labels"])
    return _training.Objective(model.classifier, list(model.classifier.parameters()),
                               head_data, damping=damping)


def train_pretrain(model, Z, cfg, seed=0):
    """Train the pretrain model in place; returns diagnostics.

    Adam in float32 (``warmup_epochs`` without the L2 term, so that the network leaves
    the collapsed all-zero solution the L2 term favours early on, then
    ``anneal_epochs`` with it, ramped up and the learning rate decaying), then, in
    float64, full-batch L-BFGS on all parameters and L-BFGS on the head alone.
    """
    model.float().eval()
    params = list(model.parameters())
    n_batches = -(-len(Z["labels"]) // cfg["batch_size"])
    start = time.perf_counter()
    for epoch in range(cfg["warmup_epochs"] + cfg["anneal_epochs"]):
        after = epoch - cfg["warmup_epochs"]
        damping = (0.0 if after < 0 else
                   cfg["pretrain_damping"] * min(1.0, (after + 1) / DAMPING_RAMP_EPOCHS))
        lr = cfg["lr"] * (0.85 ** max(after, 0))
        objective = _training.Objective(model, params, Z, damping=damping)
        _training.run_adam(objective, n_batches, lr, cfg["batch_size"], seed=seed + epoch)
    adam_seconds = time.perf_counter() - start
    model.to(getattr(torch, cfg["lbfgs_dtype"]))
    objective = _training.Objective(model, list(model.parameters()), Z,
                                    damping=cfg["pretrain_damping"])
    after_adam = _stage_report(objective, {})
    lbfgs = _training.run_lbfgs(objective, cfg["pretrain_lbfgs_iter"], cfg["tol"])
    model.double()
    objective = _training.Objective(model, list(model.parameters()), Z,
                                    damping=cfg["pretrain_damping"])
    newton = _training.run_newton(objective, model, cfg["newton_steps"], cfg["tol"])
    head = _training.run_lbfgs(_head_objective(model, Z, damping=cfg["pretrain_damping"]),
                               500, cfg["head_tol"])
    report = _stage_report(objective, {"encoder": _models.encoder_parameters(model),
                                       "head": _models.head_parameters(model)})
    return {**report, "adam_seconds": adam_seconds, "adam_grad_max": after_adam["grad_max"],
            "lbfgs_iter": lbfgs["n_iter"], "newton_steps": newton["n_steps"],
            "head_lbfgs_iter": head["n_iter"]}


def train_finetune(model, pretrain_model, X, cfg, case, seed=0):
    """Train the finetune model in place (float64); returns diagnostics.

    Both cases first fit the new head on the pretrained encoder's features (L-BFGS).
    ``"fixed"``: that is all (the encoder is the pretrain model's, untouched).
    ``"updated"``: then Adam and L-BFGS on all parameters with the proximity term
    ``alpha ||W - W_pretrained||^2``, and the head polished again.
    """
    model.double().eval()
    damping = cfg["finetune_damping"]
    head = _training.run_lbfgs(_head_objective(model, X, damping=damping), 500,
                               cfg["head_tol"])
    if case == "fixed":
        objective = _training.Objective(model, _models.head_parameters(model), X,
                                        damping=damping)
        return {**_stage_report(objective, {"head": _models.head_parameters(model)}),
                "head_lbfgs_iter": head["n_iter"]}
    def objective_in(dtype):
        model.to(dtype)
        anchors = list(zip(_models.encoder_parameters(model),
                           [p.detach().to(dtype)
                            for p in _models.encoder_parameters(pretrain_model)]))
        return _training.Objective(model, list(model.parameters()), X, damping=damping,
                                   anchors=anchors, alpha=cfg["alpha"])

    objective = objective_in(torch.float32)
    n_batches = -(-len(X["labels"]) // cfg["batch_size"])
    for epoch in range(cfg["finetune_epochs"]):
        _training.run_adam(objective, n_batches, cfg["lr"] * 0.1 * 0.8 ** epoch,
                           cfg["batch_size"], seed=seed + epoch)
    objective = objective_in(getattr(torch, cfg["lbfgs_dtype"]))
    lbfgs = _training.run_lbfgs(objective, cfg["finetune_lbfgs_iter"], cfg["tol"])
    objective = objective_in(torch.float64)
    newton = _training.run_newton(objective, model, cfg["newton_steps"], cfg["tol"])
    head = _training.run_lbfgs(_head_objective(model, X, damping=damping), 500,
                               cfg["head_tol"])
    report = _stage_report(objective, {"encoder": _models.encoder_parameters(model),
                                       "head": _models.head_parameters(model)})
    return {**report, "lbfgs_iter": lbfgs["n_iter"], "newton_steps": newton["n_steps"],
            "head_lbfgs_iter": head["n_iter"]}


# --------------------------------------------------------------------------- caching


def _digest(*parts):
    return joblib.hash([CODE_VERSION, torch.__version__, transformers.__version__, *parts])[:16]


def _cached(path, build):
    """``build()`` -> ``(state_dict, info)``, stored at ``path`` (None: no cache)."""
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["state"], {**saved["info"], "from_cache": True}
    start, cpu_start = time.perf_counter(), time.process_time()
    state, info = build()
    info = {**info, "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - cpu_start, "from_cache": False}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({"state": state, "info": info}, partial)
        os.replace(partial, path)  # atomic: parallel builders never read half a file
    return state, info


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# --------------------------------------------------------------------------- problem


def make_problem(size="full", random_state=0, case="fixed", cache_dir=None):
    """The two-stage text problem (see the ``paper.text`` docstring), trained.

    Parameters
    ----------
    size : {"full", "tiny"}, default="full"
        ``"full"``: 2,000 pretrain tweets, 500 finetune, 200 test, a 2-layer BERT of
        width 64 (minutes to train once, then cached). ``"tiny"``: 60 / 30 / 20 tweets,
        1 layer of width 16 (seconds; for tests).
    random_state : int, default=0
        Seeds the data sample, the initialisations and the minibatch order.
    case : {"fixed", "updated"}, default="fixed"
        Case 1 (the finetune model holds the pretrain model's encoder object, frozen
        while its head is trained) or Case 2 (a deep copy, finetuned with
        ``alpha ||W - W_pretrained||^2``).
    cache_dir : str, path-like, None or False, default=None
        Where trained weights are stored and looked up (``None``:
        :func:`default_cache_dir`; ``False``: train afresh, store nothing). Entries are
        keyed on the code version, the size's settings, ``random_state``, the data,
        the model configuration and the torch and transformers versions; both cases
        share the pretrain entry.

    Returns
    -------
    problem : sklearn.utils.Bunch
        ``pretrain_model``, ``finetune_model`` (float64, eval mode, every parameter
        ``requires_grad``); ``Z``, ``X``, ``x_test`` and ``Z_test`` (held-out pretrain
        tweets): dicts of equal-length int64 tensors ``input_ids``,
        ``attention_mask`` (right-padded to ``max_length``) and ``labels``;
        ``Z_text``, ``X_text``, ``x_test_text`` (the tweets, readable),
        ``X_topic``, ``x_test_topic``; ``pretrain_labels``, ``finetune_labels``
        (class names by label index); ``tokenizer``; ``case``, ``size``,
        ``random_state``; ``pretrain_damping``, ``finetune_damping``, ``alpha``,
        ``shared`` (``None`` or ``"bert"``); ``estimator_params`` (keyword arguments
        for :class:`skmsif.MultiStageInfluenceEstimator`); ``retrain_params`` (the
        defaults of :func:`retrain_without`); ``info`` (per stage: objective and
        gradient at the returned weights, ``grad_max`` / ``grad_norm`` overall and
        ``encoder_grad_max`` / ``head_grad_max``, iterations, ``train_seconds`` and
        ``train_cpu_seconds`` (when it was trained), ``from_cache``,
        ``train_accuracy``, ``test_accuracy``);
        ``timings`` (wall seconds this call spent on ``data``, ``pretrain``,
        ``finetune``: training, or loading from the cache) and ``cpu_timings`` (the
        same in CPU seconds of this process, which a busy machine does not inflate);
        ``config`` (the size's settings).
    """
    if case not in CASES:
        raise ValueError(f"case={case!r} is not one of {CASES}.")
    cfg = config(size)
    if cache_dir is None:
        cache_dir = default_cache_dir()
    cache_dir = None if cache_dir is False else Path(cache_dir)
    timings, cpu_timings = {}, {}

    def clock():
        return time.perf_counter(), time.process_time()

    def record(stage, started):
        timings[stage] = time.perf_counter() - started[0]
        cpu_timings[stage] = time.process_time() - started[1]

    started = clock()
    data = load_data(size, random_state)
    record("data", started)

    model_config = _models.make_config(
        len(data.tokenizer), len(data.pretrain_labels), hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"], max_length=cfg["max_length"],
        layer_norm_eps=cfg["layer_norm_eps"], pad_token_id=data.tokenizer.pad_token_id)
    key = _digest(size, cfg, random_state, {k: v.numpy() for k, v in data.Z.items()},
                  {k: v.numpy() for k, v in data.X.items()}, model_config.to_dict())

    pretrain_model = _models.make_pretrain_model(model_config, seed=random_state)

    def pretrain():
        info = train_pretrain(pretrain_model, data.Z, cfg, seed=random_state)
        return _state(pretrain_model), info

    started = clock()
    state, pretrain_info = _cached(
        None if cache_dir is None else cache_dir / f"pretrain-{size}-{key}.pt", pretrain)
    pretrain_model.double().load_state_dict(state)
    pretrain_info["train_accuracy"] = _training.accuracy(pretrain_model, data.Z)
    pretrain_info["test_accuracy"] = _training.accuracy(pretrain_model, data.Z_test)
    record("pretrain", started)

    finetune_model = _models.make_finetune_model(pretrain_model, len(data.finetune_labels),
                                                 case, seed=random_state + 1)

    def finetune():
        info = train_finetune(finetune_model, pretrain_model, data.X, cfg, case,
                              seed=random_state)
        return _state(finetune_model), info

    started = clock()
    state, finetune_info = _cached(
        None if cache_dir is None else cache_dir / f"finetune-{case}-{size}-{key}.pt",
        finetune)
    if case == "fixed":  # the encoder is the pretrain model's: load the head alone
        state = {k: v for k, v in state.items()
                 if not k.startswith(_models.SHARED_PREFIX + ".")}
    finetune_model.load_state_dict(state, strict=case != "fixed")
    finetune_info["train_accuracy"] = _training.accuracy(finetune_model, data.X)
    finetune_info["test_accuracy"] = _training.accuracy(finetune_model, data.x_test)
    record("finetune", started)
    for model in (pretrain_model, finetune_model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)

    shared = None if case == "fixed" else _models.SHARED_PREFIX
    estimator_params = {"embedding": case, "pretrain_damping": cfg["pretrain_damping"],
                        "finetune_damping": cfg["finetune_damping"]}
    if case == "updated":
        estimator_params.update(alpha=cfg["alpha"], shared=shared)
    return Bunch(
        pretrain_model=pretrain_model, finetune_model=finetune_model,
        Z=data.Z, X=data.X, x_test=data.x_test, Z_test=data.Z_test,
        Z_text=data.Z_text, X_text=data.X_text, x_test_text=data.x_test_text,
        X_topic=data.X_topic, x_test_topic=data.x_test_topic,
        pretrain_labels=data.pretrain_labels, finetune_labels=data.finetune_labels,
        tokenizer=data.tokenizer, case=case, size=size, random_state=random_state,
        pretrain_damping=cfg["pretrain_damping"], finetune_damping=cfg["finetune_damping"],
        alpha=cfg["alpha"], shared=shared, estimator_params=estimator_params,
        retrain_params={"pretrain_steps": cfg["retrain_pretrain_steps"],
                        "finetune_steps": cfg["retrain_finetune_steps"],
                        "lr": cfg["retrain_lr"], "batch_size": cfg["retrain_batch_size"]},
        info=Bunch(pretrain=pretrain_info, finetune=finetune_info),
        timings=timings, cpu_timings=cpu_timings, config=cfg,
    )


def test_loss(model, data):
    """Summed cross-entropy of ``model`` (eval mode) over ``data``."""
    return float(np.sum(_training.per_example_loss(model, data)))
