"""Which pretraining digits are to blame for a finetuned model's mistakes?

This demo reproduces, at toy scale, Fig. 3 of Chen et al., "Multi-Stage Influence
Function": trace the errors of a *finetuned* model back to individual examples of the
*pretraining* data.

The set-up (all offline, runs in well under a minute on two CPU cores):

* Data: scikit-learn's 8x8 handwritten digits, pixels scaled to [0, 1].
* Pretrain task: classify digits 0-3. The model is a small embedding
  (``Linear(64, 16) + Tanh``) followed by a 4-way linear head.
* Finetune task: classify digits 4-9. The *same* embedding object is reused and kept
  fixed; only a new 6-way linear head is trained ("Case 1" of the paper). The
  embedding never saw digits 4-9, so the finetuned model is right only about 70% of
  the time: plenty of mistakes to explain.
* Both stages are trained to convergence with full-batch L-BFGS and an L2 term
  ``damping / 2 * ||params||^2``, so that the damped Hessians the estimator uses are the
  exact Hessians of the objectives that were minimised.

We then take a few finetune-test digits the finetuned model gets wrong and ask
``MultiStageInfluenceEstimator`` (exact Hessians) how every pretraining digit
influences the test loss on each of them.

How to read the sign. ``I(z, x)`` is the derivative of the test loss on ``x`` with
respect to upweighting the pretraining example ``z``:

* ``I > 0``: *harmful* -- more weight on ``z`` raises the loss on ``x``; removing ``z``
  and retraining both stages would lower it.
* ``I < 0``: *helpful* -- removing ``z`` would raise the loss on ``x``.
* Removing ``z`` (one of ``m`` pretraining examples) changes the test loss by about
  ``-I / m``; that number is printed as ``dLoss(remove)``.

The output is a table per test digit and one PNG (``--out``, default
``digits_influence.png``): one row per misclassified test digit, showing the digit
itself, then the most harmful (red) and the most helpful (green) pretraining digits,
each titled with its index in the pretraining set, its label and its influence value.
The script ends with the pretraining digits that are most harmful / helpful to the
whole finetune test set (``est.score``).

Run it from the repository root::

    python examples/digits_demo.py --out digits_influence.png
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

from skmsif import MultiStageInfluenceEstimator  # noqa: E402

PRETRAIN_DIGITS = [0, 1, 2, 3]
FINETUNE_DIGITS = [4, 5, 6, 7, 8, 9]
PRETRAIN_DAMPING = 1e-2  # L2 weight of the pretrain stage == estimator's damping
FINETUNE_DAMPING = 1e-3  # L2 weight of the finetune head == estimator's damping


def load_data(seed):
    """Split sklearn's digits into a pretrain set and finetune train/test sets."""
    digits = load_digits()
    images = digits.data / 16.0
    labels = digits.target

    pre = np.isin(labels, PRETRAIN_DIGITS)
    z_x, z_y = images[pre], labels[pre]  # labels 0-3 are the digits themselves

    fin = np.isin(labels, FINETUNE_DIGITS)
    f_x, f_y = images[fin], labels[fin] - FINETUNE_DIGITS[0]  # digits 4-9 -> classes 0-5
    xtr, xte, ytr, yte = train_test_split(
        f_x, f_y, test_size=0.5, stratify=f_y, random_state=seed)

    def as_torch(x, y):
        return torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)

    return as_torch(z_x, z_y), as_torch(xtr, ytr), as_torch(xte, yte)


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
    inputs, targets = data
    with torch.no_grad():
        return (model(inputs).argmax(1) == targets).double().mean().item()


def show_digit(ax, image, title, color):
    ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="digits_influence.png", help="PNG to write")
    parser.add_argument("--n-test", type=int, default=3,
                        help="number of misclassified test digits to explain")
    parser.add_argument("--top", type=int, default=5,
                        help="harmful / helpful pretraining digits shown per test digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    Z, X_train, X_test = load_data(args.seed)
    m = len(Z[1])
    print(f"pretrain: {m} digits {PRETRAIN_DIGITS} | finetune: {len(X_train[1])} train, "
          f"{len(X_test[1])} test digits {FINETUNE_DIGITS}")

    # --- Models: one embedding object shared by both heads (Case 1). -----------------
    embedding = nn.Sequential(nn.Linear(64, 16), nn.Tanh())
    pretrain_model = nn.Sequential(embedding, nn.Linear(16, len(PRETRAIN_DIGITS))).double()
    finetune_head = nn.Linear(16, len(FINETUNE_DIGITS))
    finetune_model = nn.Sequential(embedding, finetune_head).double()
    n_pre = sum(p.numel() for p in pretrain_model.parameters())
    n_head = sum(p.numel() for p in finetune_head.parameters())
    print(f"parameters: pretrain model {n_pre}, finetune head {n_head}")

    # --- Stage 1: pretrain embedding + 4-way head. ------------------------------------
    cross_entropy = nn.CrossEntropyLoss()
    loss, gnorm = train_lbfgs(pretrain_model.parameters(),
                              lambda: cross_entropy(pretrain_model(Z[0]), Z[1]),
                              PRETRAIN_DAMPING)
    print(f"pretrain : objective {loss:.4f}, |grad| {gnorm:.1e}, "
          f"train accuracy {accuracy(pretrain_model, Z):.3f}")

    # --- Stage 2: freeze the embedding, train only the new 6-way head. ----------------
    with torch.no_grad():
        features = embedding(X_train[0])
    loss, gnorm = train_lbfgs(finetune_head.parameters(),
                              lambda: cross_entropy(finetune_head(features), X_train[1]),
                              FINETUNE_DAMPING)
    print(f"finetune : objective {loss:.4f}, |grad| {gnorm:.1e}, "
          f"train accuracy {accuracy(finetune_model, X_train):.3f}, "
          f"test accuracy {accuracy(finetune_model, X_test):.3f}")
    train_time = time.perf_counter() - start

    # --- Pick the misclassified test digits the model is most confidently wrong on. ---
    with torch.no_grad():
        logits = finetune_model(X_test[0])
        test_loss = nn.functional.cross_entropy(logits, X_test[1], reduction="none")
        predicted = logits.argmax(1)
    wrong = torch.nonzero(predicted != X_test[1]).flatten()
    chosen = wrong[torch.argsort(test_loss[wrong], descending=True)][:args.n_test]
    print(f"{len(wrong)} misclassified test digits; explaining the {len(chosen)} "
          "with the largest test loss")

    # --- Multi-stage influence of every pretraining digit on those test digits. -------
    t0 = time.perf_counter()
    est = MultiStageInfluenceEstimator(embedding="fixed", hessian="exact",
                                       pretrain_damping=PRETRAIN_DAMPING,
                                       finetune_damping=FINETUNE_DAMPING)
    est.fit(pretrain_model, finetune_model, Z, X_train)
    influence = est.influence((X_test[0][chosen], X_test[1][chosen]))  # (n_test, m)
    total = est.score(X_test)  # (m,): summed over the whole finetune test set
    influence_time = time.perf_counter() - t0

    # --- Print and plot. -------------------------------------------------------------
    k = args.top
    fig, axes = plt.subplots(len(chosen), 2 * k + 1, squeeze=False, layout="constrained",
                             figsize=(1.3 * (2 * k + 1), 1.9 * len(chosen) + 0.6))
    for row, t in enumerate(chosen.tolist()):
        true = FINETUNE_DIGITS[X_test[1][t].item()]
        pred = FINETUNE_DIGITS[predicted[t].item()]
        scores = influence[row]
        order = np.argsort(scores)
        harmful, helpful = order[::-1][:k], order[:k]

        print(f"\nTest digit #{t}: true {true}, predicted {pred}, "
              f"test loss {test_loss[t].item():.3f}")
        print(f"  {'':8s} {'index':>6s} {'label':>5s} {'influence':>11s} "
              f"{'dLoss(remove)':>14s}")
        for kind, picks in (("harmful", harmful), ("helpful", helpful)):
            for i in picks:
                print(f"  {kind:8s} {i:6d} {Z[1][i].item():5d} {scores[i]:+11.4f} "
                      f"{-scores[i] / m:+14.2e}")

        show_digit(axes[row, 0], X_test[0][t].numpy(),
                   f"test #{t}\ntrue {true}, pred {pred}", color="tab:blue")
        for col, i in enumerate(list(harmful) + list(helpful), start=1):
            show_digit(axes[row, col], Z[0][i].numpy(),
                       f"#{i}: digit {Z[1][i].item()}\nI = {scores[i]:+.3g}",
                       color="tab:red" if col <= k else "tab:green")

    fig.suptitle("Pretraining digits with the largest influence on misclassified "
                 f"finetune-test digits (blue)\nred: the {k} most harmful (I > 0, removing "
                 f"them lowers the test loss)    green: the {k} most helpful (I < 0)",
                 fontsize=10)
    fig.savefig(args.out, dpi=120)

    order = np.argsort(total)
    print(f"\nWhole finetune test set ({len(X_test[1])} digits), summed influence:")
    print("  most harmful: " + ", ".join(
        f"#{i} ({Z[1][i].item()}) {total[i]:+.3f}" for i in order[::-1][:k]))
    print("  most helpful: " + ", ".join(
        f"#{i} ({Z[1][i].item()}) {total[i]:+.3f}" for i in order[:k]))

    print(f"\nwrote {args.out}")
    print(f"time: training {train_time:.1f} s, influence {influence_time:.1f} s, "
          f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
