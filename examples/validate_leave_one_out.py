"""
Check influence against leave-one-out retraining, in both cases
================================================================

An influence estimate is a prediction: removing pretraining example ``z`` (one of ``m``)
and retraining both stages should change the summed test loss by about ``-I(z) / m``.
This script makes that prediction and then checks it by actually removing examples and
retraining, for both finetuning cases of the paper:

* **Case 1**, ``embedding="fixed"``: the finetune model reuses the pretrained embedding
  unchanged and trains only a new head.
* **Case 2**, ``embedding="updated"``: the finetune model trains a copy of the embedding
  too, tied to the pretrained one by ``alpha * ||W - W_pretrained||^2``.

Data: 300 of scikit-learn's digits 0-3 for pretraining, 200 of the digits 4-9 for
finetuning and 50 more as the test set. The model is defined below: an embedding
``Linear(64, 8) + Tanh`` and a linear head per task. Both stages are trained to
convergence, with a few lines of plain torch, on the mean cross-entropy plus an L2 term
equal to the estimator's damping, so the damped Hessians are the Hessians of the
objectives that were minimised. The audited examples are the 20 of largest ``|I|`` and
20 drawn at random (:func:`skmsif.validation.audit_indices`); each is removed in turn and
both stages retrained by :func:`skmsif.validation.leave_one_out`. The identity-Hessian
baseline of the paper's Fig. 4 is scored against the same retraining.

Run it from the repository root (it writes ``validate_leave_one_out.png``)::

    python examples/validate_leave_one_out.py
"""

import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from skmsif import MultiStageInfluenceEstimator
from skmsif.datasets import load_digits_split
from skmsif.validation import audit_indices, faithfulness, leave_one_out

PRETRAIN_DAMPING, FINETUNE_DAMPING, ALPHA = 1e-2, 1e-2, 1e-1
HIDDEN = 8  # embedding width
N_TOP, N_RANDOM = 20, 20
SEED = 0
OUT = "validate_leave_one_out.png"

start = time.perf_counter()
data = load_digits_split(SEED, n_pretrain=300, n_finetune=200, n_test=50)
m = len(data.Z[1])

# %%
# The model and its training objective
# ------------------------------------
# ``train`` minimises, over ``params``, the mean cross-entropy of ``model`` on ``data``
# plus ``damping / 2 * ||params||^2`` and, for Case 2, ``alpha * ||W - W_bar||^2`` over
# the ``anchors`` ``(W, W_bar)``: the objectives :func:`~skmsif.validation.leave_one_out`
# retrains. Full-batch L-BFGS takes the largest gradient entry to about 1e-9.


def train(model, params, data, damping, anchors=(), alpha=0.0):
    inputs, targets = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    params = list(params)
    optimizer = torch.optim.LBFGS(params, max_iter=5000, tolerance_grad=1e-10,
                                  tolerance_change=1e-15, history_size=50,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss = loss + damping / 2 * sum((p * p).sum() for p in params)
        loss = loss + alpha * sum(((w - w_bar) ** 2).sum() for w, w_bar in anchors)
        loss.backward()
        return loss

    optimizer.step(objective)
    objective()
    return max(p.grad.abs().max().item() for p in params)  # the largest gradient entry


torch.manual_seed(SEED)
embedding = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh())  # W, shared by both tasks
pretrain_model = nn.Sequential(embedding, nn.Linear(HIDDEN, 4)).double()  # head U
finetune_head = nn.Linear(HIDDEN, 6).double()  # head Theta, digits 4-9

# %%
# Train the two stages for each case
# ----------------------------------
# In Case 1 the two models hold the same embedding object, and only the new head is
# trained on the finetune task, on the frozen embedding's features. In Case 2 the
# finetune model gets a deep copy of the embedding, trained with the head, and the
# proximity term ``alpha``.

grad = train(pretrain_model, pretrain_model.parameters(), data.Z, PRETRAIN_DAMPING)
print(f"pretrain: largest gradient entry {grad:.1e}")
# Case 2 starts from a copy of the pretrained embedding and of the untrained head.
finetune_updated = nn.Sequential(copy.deepcopy(embedding), copy.deepcopy(finetune_head))

# Case 1: the embedding frozen; the head trained on its outputs.
finetune_fixed = nn.Sequential(embedding, finetune_head)
with torch.no_grad():
    features = embedding(torch.as_tensor(data.X[0]))
grad = train(finetune_head, finetune_head.parameters(), (features, data.X[1]),
             FINETUNE_DAMPING)
print(f"finetune, Case 1: largest gradient entry {grad:.1e}")

# Case 2: embedding and head trained, the embedding pulled towards the pretrained one.
anchors = [(w, w_bar.detach().clone())
           for w, w_bar in zip(finetune_updated[0].parameters(), embedding.parameters())]
grad = train(finetune_updated, finetune_updated.parameters(), data.X, FINETUNE_DAMPING,
             anchors, ALPHA)
print(f"finetune, Case 2: largest gradient entry {grad:.1e}")

CASES = {
    "Case 1 (embedding fixed)": (finetune_fixed, {"embedding": "fixed"}),
    "Case 2 (embedding updated)": (finetune_updated,
                                   {"embedding": "updated", "shared": "0", "alpha": ALPHA}),
}

# %%
# Predict, retrain, compare
# -------------------------
# ``faithfulness`` compares the predicted changes ``-I/m`` with the retrained ones: the
# Pearson and Spearman correlations, and the slope of predicted on actual (1 means the
# right scale).

results = {}
for name, (finetune_model, case) in CASES.items():
    settings = {"pretrain_damping": PRETRAIN_DAMPING, "finetune_damping": FINETUNE_DAMPING,
                **case}
    est = MultiStageInfluenceEstimator(hessian="exact", **settings)
    scores = est.fit(pretrain_model, finetune_model, data.Z, data.X).score(data.x_test)
    identity = MultiStageInfluenceEstimator(hessian="identity", **settings)
    baseline = identity.fit(pretrain_model, finetune_model, data.Z, data.X).score(
        data.x_test)

    audit = audit_indices(scores, n_top=N_TOP, n_random=N_RANDOM, random_state=SEED)
    t0 = time.perf_counter()
    actual = leave_one_out(pretrain_model, finetune_model, data.Z, data.X, data.x_test,
                           audit.indices, tol=1e-6, n_jobs=2, **settings)
    seconds = time.perf_counter() - t0

    predicted = -scores[audit.indices] / m
    metrics = faithfulness(predicted, actual, groups=audit.groups)
    baseline_metrics = faithfulness(-baseline[audit.indices] / m, actual)
    results[name] = (predicted, actual, audit, -baseline[audit.indices] / m)
    print(f"{name}: {len(actual)} retrains in {seconds:.1f} s")
    for group in ("all", "top", "random"):
        g = metrics[group]
        print(f"  influence, {group:6s} n={g['n']:2d}  Pearson {g['pearson']:.3f}  "
              f"Spearman {g['spearman']:.3f}  slope {g['slope']:.3f}")
    g = baseline_metrics["all"]
    print(f"  identity,  all    n={g['n']:2d}  Pearson {g['pearson']:.3f}  "
          f"Spearman {g['spearman']:.3f}")

# %%
# The picture
# -----------
# Each point is one removed pretraining digit: the retrained change of the summed test
# loss (x) against the prediction (y). On the diagonal, the prediction is exact. The
# identity-Hessian baseline's predictions (grey) are rescaled to the same spread, since
# its scale is arbitrary; only their order and sign carry information.

fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
for ax, (name, (predicted, actual, audit, baseline)) in zip(axes, results.items()):
    scale = np.std(predicted) / np.std(baseline)
    ax.scatter(actual, baseline * scale, s=14, color="0.7", label="identity Hessian (rescaled)")
    ax.scatter(actual[audit.groups["top"]], predicted[audit.groups["top"]], s=18,
               color="tab:red", label=f"top {N_TOP} by |I|")
    ax.scatter(actual[audit.groups["random"]], predicted[audit.groups["random"]], s=18,
               color="tab:blue", label=f"{N_RANDOM} at random")
    limit = 1.05 * np.abs(np.concatenate([actual, predicted])).max()
    ax.plot([-limit, limit], [-limit, limit], color="black", linewidth=0.8)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_xlabel("actual change of the test loss (leave-one-out)")
    ax.set_ylabel("predicted change, -I/m")
    r = faithfulness(predicted, actual)["all"]["pearson"]
    ax.set_title(f"{name}: Pearson {r:.3f}")
    ax.legend(loc="upper left", fontsize=8)
fig.savefig(OUT, dpi=110)
print(f"wrote {OUT}; total {time.perf_counter() - start:.1f} s")
