"""
Which pretraining digits are to blame for a finetuned model's mistakes?
========================================================================

This demo reproduces Fig. 3 of Chen et al., "Multi-Stage Influence Function", at toy
scale. It traces the errors of a *finetuned* model back to individual examples of the
*pretraining* data.

The set-up runs offline in seconds on two CPU cores:

* Data: scikit-learn's 8x8 handwritten digits, pixels scaled to [0, 1].
* Pretrain task: classify digits 0-3. The model is a small embedding
  (``Linear(64, 16) + Tanh``) followed by a 4-way linear head.
* Finetune task: classify digits 4-9. The *same* embedding object is reused and kept
  fixed, and only a new 6-way linear head is trained (Case 1 of the paper). The embedding
  never saw digits 4-9, so the finetuned model is right only about 70% of the time. That
  leaves plenty of mistakes to explain.
* Both stages are trained to convergence with full-batch L-BFGS and an L2 term
  ``damping / 2 * ||params||^2``. The damped Hessians the estimator uses are then the
  exact Hessians of the objectives that were minimised.

How to read the sign. ``I(z, x)`` is the derivative of the test loss on ``x`` with
respect to upweighting the pretraining example ``z``:

* ``I > 0``: *harmful*. More weight on ``z`` raises the loss on ``x``; removing ``z``
  and retraining both stages would lower it.
* ``I < 0``: *helpful*. Removing ``z`` would raise the loss on ``x``.
* Removing ``z``, one of ``m`` pretraining examples, changes the test loss by about
  ``-I / m``; the tables print that number as ``dLoss(remove)``.

Run it from the repository root; it writes ``digits_influence.png``::

    python examples/digits_demo.py
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from skmsif import MultiStageInfluenceEstimator

PRETRAIN_DIGITS = [0, 1, 2, 3]
FINETUNE_DIGITS = [4, 5, 6, 7, 8, 9]
PRETRAIN_DAMPING = 1e-2  # L2 weight of the pretrain stage == the estimator's damping
FINETUNE_DAMPING = 1e-3  # L2 weight of the finetune head == the estimator's damping
N_TEST = 3  # misclassified test digits to explain
TOP = 5  # harmful and helpful pretraining digits shown for each
SEED = 0
OUT = "digits_influence.png"

start = time.perf_counter()
torch.manual_seed(SEED)

# %%
# Data
# ----
# The pretrain set ``Z`` holds every digit 0-3. Digits 4-9 are split in half into the
# finetune training set ``X`` and a finetune test set.

digits = load_digits()
images, labels = digits.data / 16.0, digits.target
pre = np.isin(labels, PRETRAIN_DIGITS)
fin = np.isin(labels, FINETUNE_DIGITS)
x_train, x_test, y_train, y_test = train_test_split(
    images[fin], labels[fin] - FINETUNE_DIGITS[0], test_size=0.5,
    stratify=labels[fin], random_state=SEED)


def as_torch(inputs, targets):
    return (torch.as_tensor(inputs, dtype=torch.float64),
            torch.as_tensor(targets, dtype=torch.long))


Z = as_torch(images[pre], labels[pre])  # labels 0-3 are the digits themselves
X_train, X_test = as_torch(x_train, y_train), as_torch(x_test, y_test)
m = len(Z[1])
print(f"pretrain: {m} digits {PRETRAIN_DIGITS} | finetune: {len(X_train[1])} train, "
      f"{len(X_test[1])} test digits {FINETUNE_DIGITS}")

# %%
# Models and training
# -------------------
# One embedding object is shared by the two models, so the estimator finds the shared
# parameters ``W`` by identity (``embedding="fixed"``, ``shared=None``).


def train_lbfgs(params, loss_fn, damping, max_iter=2000):
    """Minimise ``loss_fn() + damping/2 * ||params||^2`` to convergence, full batch."""
    params = list(params)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=50,
                            tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = loss_fn() + 0.5 * damping * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    opt.step(objective)
    loss = objective()  # also leaves the final gradient in p.grad
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    opt.zero_grad(set_to_none=True)
    return loss.item(), grad_norm


def accuracy(model, data):
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).double().mean().item()


embedding = nn.Sequential(nn.Linear(64, 16), nn.Tanh())
pretrain_model = nn.Sequential(embedding, nn.Linear(16, len(PRETRAIN_DIGITS))).double()
finetune_head = nn.Linear(16, len(FINETUNE_DIGITS))
finetune_model = nn.Sequential(embedding, finetune_head).double()
cross_entropy = nn.CrossEntropyLoss()

# Stage 1: the embedding and the 4-way head on digits 0-3.
loss, grad_norm = train_lbfgs(pretrain_model.parameters(),
                              lambda: cross_entropy(pretrain_model(Z[0]), Z[1]),
                              PRETRAIN_DAMPING)
print(f"pretrain : objective {loss:.4f}, |grad| {grad_norm:.1e}, "
      f"train accuracy {accuracy(pretrain_model, Z):.3f}")

# Stage 2: the embedding frozen, only the new 6-way head on digits 4-9.
with torch.no_grad():
    features = embedding(X_train[0])
loss, grad_norm = train_lbfgs(finetune_head.parameters(),
                              lambda: cross_entropy(finetune_head(features), X_train[1]),
                              FINETUNE_DAMPING)
print(f"finetune : objective {loss:.4f}, |grad| {grad_norm:.1e}, "
      f"train accuracy {accuracy(finetune_model, X_train):.3f}, "
      f"test accuracy {accuracy(finetune_model, X_test):.3f}")
train_time = time.perf_counter() - start

# %%
# Influence of every pretraining digit
# ------------------------------------
# We explain the misclassified test digits the model is most confidently wrong on.
# ``influence`` gives one row per test digit; ``score`` sums over the whole test set.

with torch.no_grad():
    logits = finetune_model(X_test[0])
    test_loss = nn.functional.cross_entropy(logits, X_test[1], reduction="none")
    predicted = logits.argmax(1)
wrong = torch.nonzero(predicted != X_test[1]).flatten()
chosen = wrong[torch.argsort(test_loss[wrong], descending=True)][:N_TEST]
print(f"{len(wrong)} misclassified test digits; explaining the {len(chosen)} "
      "with the largest test loss")

t0 = time.perf_counter()
est = MultiStageInfluenceEstimator(embedding="fixed", hessian="exact",
                                   pretrain_damping=PRETRAIN_DAMPING,
                                   finetune_damping=FINETUNE_DAMPING)
est.fit(pretrain_model, finetune_model, Z, X_train)
influence = est.influence((X_test[0][chosen], X_test[1][chosen]))  # (N_TEST, m)
total = est.score(X_test)  # (m,): summed over the whole finetune test set
influence_time = time.perf_counter() - t0

# %%
# The most harmful and the most helpful pretraining digits
# ---------------------------------------------------------
# Each row starts with a misclassified test digit (blue), then its most harmful
# pretraining digits (red, ``I > 0``) and its most helpful ones (green, ``I < 0``),
# each titled with its index in the pretraining set and its influence.


def show_digit(ax, image, title, color):
    ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)


fig, axes = plt.subplots(len(chosen), 2 * TOP + 1, squeeze=False, layout="constrained",
                         figsize=(1.3 * (2 * TOP + 1), 1.9 * len(chosen) + 0.6))
for row, t in enumerate(chosen.tolist()):
    true = FINETUNE_DIGITS[X_test[1][t].item()]
    pred = FINETUNE_DIGITS[predicted[t].item()]
    scores = influence[row]
    order = np.argsort(scores)
    harmful, helpful = order[::-1][:TOP], order[:TOP]

    print(f"\nTest digit #{t}: true {true}, predicted {pred}, "
          f"test loss {test_loss[t].item():.3f}")
    print(f"  {'':8s} {'index':>6s} {'label':>5s} {'influence':>11s} {'dLoss(remove)':>14s}")
    for kind, picks in (("harmful", harmful), ("helpful", helpful)):
        for i in picks:
            print(f"  {kind:8s} {i:6d} {Z[1][i].item():5d} {scores[i]:+11.4f} "
                  f"{-scores[i] / m:+14.2e}")

    show_digit(axes[row, 0], X_test[0][t].numpy(),
               f"test #{t}\ntrue {true}, pred {pred}", color="tab:blue")
    for col, i in enumerate(list(harmful) + list(helpful), start=1):
        show_digit(axes[row, col], Z[0][i].numpy(),
                   f"#{i}: digit {Z[1][i].item()}\nI = {scores[i]:+.3g}",
                   color="tab:red" if col <= TOP else "tab:green")

fig.suptitle("Pretraining digits with the largest influence on misclassified "
             f"finetune-test digits (blue)\nred: the {TOP} most harmful (I > 0, removing "
             f"them lowers the test loss)    green: the {TOP} most helpful (I < 0)",
             fontsize=10)
fig.savefig(OUT, dpi=120)

# %%
# The whole test set
# ------------------
# ``score`` is the influence on the summed test loss over every finetune test digit.

order = np.argsort(total)
print(f"Whole finetune test set ({len(X_test[1])} digits), summed influence:")
print("  most harmful: " + ", ".join(
    f"#{i} ({Z[1][i].item()}) {total[i]:+.3f}" for i in order[::-1][:TOP]))
print("  most helpful: " + ", ".join(
    f"#{i} ({Z[1][i].item()}) {total[i]:+.3f}" for i in order[:TOP]))
print(f"\nwrote {OUT}")
print(f"time: training {train_time:.1f} s, influence {influence_time:.1f} s, "
      f"total {time.perf_counter() - start:.1f} s")
