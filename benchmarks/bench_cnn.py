"""EK-FAC, Gauss-Newton CG, low rank and kronfluence on the paper's CNN, side by side.

Set-up: Fashion-MNIST (Debian package ``dataset-fashion-mnist``), the paper's Table A CNN
(``paper.models.make_mnist_cnn``), pretrained on classes 0-3 (``--m`` images, 24,000 by
default: all of them), a new head finetuned on ``--n-finetune`` images of classes 4-9 with
the embedding fixed (Case 1), the test images of classes 4-9 as test points
(``skmsif.datasets.fashion_mnist_split``). Both models are trained briefly with Adam
(L2 equal to the dampings) and cached in ``--cache-dir``. Passes run in ``--dtype``
(float32 by default); solves and sums are float64 whatever it is.

Every measured method runs in a subprocess of its own, one after the other, so that its
peak resident memory (``os.wait4``) is its own. Timings are printed as ratios to one
training epoch: one epoch of Adam over Z at batch 128, measured in a subprocess at the
start and again at the end of the same run (the machine is shared; the mean is used and
the drift printed).

  (a) EK-FAC ``score`` end to end (fit + score of the whole test set), the factors on all
      of Z, and on ``--hessian-samples`` of it; target <= 5 epochs. EK-FAC is the
      pretrain stage's curvature; the finetune head's system is solved exactly
      (``--finetune-hessian``, default ``exact``: the linear head's dense curvature in
      closed form, then Cholesky; ``cg`` for Gauss-Newton CG; ``ekfac`` for EK-FAC on
      both stages, which on this head at ``finetune_damping=1e-3`` is far off the
      converged solve). Beside it, the pretrain stage by Gauss-Newton CG stopped at
      relative residual ``--budget-tol`` (head exact, curvature on
      ``--hessian-samples``), plain (``cg_budget``) and preconditioned by EK-FAC
      (``pcg``, ``preconditioner="ekfac"``): the fast accurate alternative;
  (b) the (``--n-matrix``, m) ``influence`` matrix with EK-FAC: fit + factors + the
      scoring pass of ``--n-matrix`` rows over Z. The factors (one finetune solve and
      one product with the mixed block ``H_WTheta`` over the finetune set per test point)
      are timed for ``--matrix-factor-points`` test points and scaled to ``--n-matrix``;
      the scoring pass is timed whole (``influence_from_factors``). Target <= 20 epochs;
  (c) EK-FAC against a converged Gauss-Newton CG solve (``hessian="cg",
      curvature="gauss_newton", iterative_solver="cg"``, float64 passes, the pretrain
      curvature on ``--hessian-samples`` images): Spearman and Pearson of the scores;
      target Spearman >= 0.9;
  (d) kronfluence's EK-FAC on the same pretrain model and data (single stage: the
      pretrain loss of the test images at the model's predicted labels, against every
      pretrain example; factors on all of Z, sampled labels, its default float32): our
      (a) and (b) over its aggregated-query and per-query scores; target <= 1.0x. And
      its factors on the same ``--hessian-samples`` images as ours
      (``kronfluence_sampled``, summed scores only), against our runs on that sample;
  (e) peak resident memory of every subprocess;
  (f) precision: float32 against float64 passes for EK-FAC (factors on
      ``--hessian-samples``) and for Gauss-Newton CG: time, relative difference and
      Spearman of the scores against the float64 result;
  (g) ``hessian="lowrank"`` (``--rank``, Gauss-Newton, the finetune head by CG) against
      the converged Gauss-Newton CG solve: Spearman and Pearson.

Run::

    python benchmarks/bench_cnn.py --json /tmp/bench_cnn.json    # m = 24,000: hours
    python benchmarks/bench_cnn.py --size tiny                   # seconds; the smoke test
    # after a change to the EK-FAC path, keep the slow references of the previous run:
    python benchmarks/bench_cnn.py --reuse cg_float64,cg_float32,lowrank

Threads are pinned (torch and BLAS, in every subprocess) to ``--threads`` (default 1).
No GPU is used (``--device`` exists, but the CUDA path was not measured).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # the repository: paper/

SIZES = {
    "full": dict(m=None, n_finetune=5000, n_test=None, n_matrix=1000, matrix_factor_points=1000,
                 hessian_samples=1000, rank=100, max_iter=500, pretrain_epochs=3,
                 finetune_epochs=5),
    "tiny": dict(m=64, n_finetune=32, n_test=16, n_matrix=8, matrix_factor_points=2,
                 hessian_samples=32, rank=4, max_iter=10, pretrain_epochs=1,
                 finetune_epochs=1),
}
BATCH = 128  # the training epoch's minibatch, and the estimator's batch size
PRETRAIN_DAMPING, FINETUNE_DAMPING = 1e-2, 1e-3


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="preset; the options below override it")
    parser.add_argument("--m", type=int, default=None,
                        help="pretrain images (default: all 24,000 of classes 0-3)")
    for name in ("n_finetune", "n_test", "n_matrix", "matrix_factor_points",
                 "hessian_samples", "rank", "max_iter", "pretrain_epochs", "finetune_epochs"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the passes of the timed runs (a), (b), (g)")
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="relative residual of the reference Gauss-Newton CG solve")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--skip-precision", action="store_true")
    parser.add_argument("--skip-lowrank", action="store_true")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--finetune-hessian", default="exact", choices=["cg", "exact", "ekfac"],
                        help="the finetune (head) stage's backend in the EK-FAC runs: "
                             "dense (default; the head's closed form and Cholesky), "
                             "Gauss-Newton CG, or EK-FAC too")
    parser.add_argument("--budget-tol", type=float, default=0.1,
                        help="relative residual of the budgeted Gauss-Newton CG runs "
                             "(cg_budget, and pcg with the EK-FAC preconditioner)")
    parser.add_argument("--sampled-only", action="store_true",
                        help="one EK-FAC run, its factors on --hessian-samples of Z (it "
                             "also computes the matrix of (b)); skips the factors on all "
                             "of Z, whose eigenvalue pass is the slow part")
    parser.add_argument("--reuse", default="",
                        help="comma-separated runs (e.g. cg_float64,lowrank) whose results "
                             "a previous run with the same settings left in the cache "
                             "folder are reported again instead of recomputed; every "
                             "timed run still times its own epoch")
    parser.add_argument("--cache-dir", default="/tmp/skmsif-bench-cnn")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None and not (key == "m" and args.size == "full"):
            setattr(args, key, value)
    return args


ARGS = _parse()
from _threads import pin_threads  # noqa: E402

pin_threads(ARGS.threads)  # before numpy, scipy and torch load

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402


WORK = Path(ARGS.cache_dir) / (
    f"m{ARGS.m}-n{ARGS.n_finetune}-t{ARGS.n_test}-e{ARGS.pretrain_epochs}"
    f"-{ARGS.finetune_epochs}-s{ARGS.seed}")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- set-up

def prepare():
    """Data (saved as .npz for the workers) and both models, trained once and cached."""
    from paper.models import make_mnist_cnn
    from paper.training import accuracy, fit_adam
    from skmsif.datasets import fashion_mnist_split

    WORK.mkdir(parents=True, exist_ok=True)
    data_path, model_path = WORK / "data.npz", WORK / "models.pt"
    if not data_path.is_file():
        split = fashion_mnist_split(random_state=ARGS.seed, n_pretrain=ARGS.m,
                                    n_finetune=ARGS.n_finetune, n_test=ARGS.n_test)
        np.savez(data_path, Z0=split.Z[0], Z1=split.Z[1], X0=split.X[0], X1=split.X[1],
                 T0=split.x_test[0], T1=split.x_test[1])
    data = load_data()
    if not model_path.is_file():
        _, pretrain_model, finetune_model = make_mnist_cnn(seed=ARGS.seed)
        start = time.perf_counter()
        fit_adam(pretrain_model, data["Z"], damping=PRETRAIN_DAMPING,
                 n_steps=ARGS.pretrain_epochs * -(-len(data["Z"][1]) // BATCH),
                 batch_size=BATCH, random_state=ARGS.seed)
        head = list(finetune_model[1].parameters())
        fit_adam(finetune_model, data["X"], params=head, damping=FINETUNE_DAMPING,
                 n_steps=ARGS.finetune_epochs * -(-len(data["X"][1]) // BATCH),
                 batch_size=BATCH, random_state=ARGS.seed)
        torch.save({"pretrain": pretrain_model.state_dict(),
                    "finetune": finetune_model.state_dict(),
                    "accuracy": {"pretrain_train": accuracy(pretrain_model, data["Z"]),
                                 "finetune_test": accuracy(finetune_model, data["x_test"])}},
                   model_path)
        log(f"trained both models in {time.perf_counter() - start:.0f} s (cached in "
            f"{model_path})")
    return data, torch.load(model_path, weights_only=True)["accuracy"]


def load_data():
    arrays = np.load(WORK / "data.npz")
    return {"Z": (arrays["Z0"], arrays["Z1"]), "X": (arrays["X0"], arrays["X1"]),
            "x_test": (arrays["T0"], arrays["T1"])}


def load_models():
    from paper.models import make_mnist_cnn

    _, pretrain_model, finetune_model = make_mnist_cnn(seed=ARGS.seed)
    saved = torch.load(WORK / "models.pt", weights_only=True)
    pretrain_model.load_state_dict(saved["pretrain"])
    finetune_model.load_state_dict(saved["finetune"])
    return pretrain_model, finetune_model


# --------------------------------------------------------------------------- workers

class Timers:
    """Wall time spent inside chosen functions (wrapped, behaviour unchanged)."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, owner, attribute, label):
        original = owner.__dict__[attribute]
        function = original.__func__ if isinstance(original, classmethod) else original
        timers = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timers.seconds[label] = (timers.seconds.get(label, 0.0)
                                         + time.perf_counter() - start)

        setattr(owner, attribute, classmethod(timed) if isinstance(original, classmethod)
                else timed)


def estimator(**params):
    from skmsif import MultiStageInfluenceEstimator

    settings = dict(embedding="fixed", pretrain_damping=PRETRAIN_DAMPING,
                    finetune_damping=FINETUNE_DAMPING, batch_size=BATCH,
                    random_state=ARGS.seed, device=ARGS.device, max_iter=ARGS.max_iter)
    settings.update(params)
    return MultiStageInfluenceEstimator(**settings)


def histories(est):
    out = {}
    for stage in ("pretrain", "finetune"):
        history = getattr(getattr(est, f"{stage}_solver_"), "history_", None)
        if history:
            out[stage] = {"n_iter": int(history[-1]["n_iter"]),
                          "residual": float(history[-1]["residual"])}
    return out


def worker_epoch(data):
    from paper.training import fit_adam

    pretrain_model, _ = load_models()
    fit_adam(pretrain_model, data["Z"], damping=PRETRAIN_DAMPING, n_steps=3,
             batch_size=BATCH)  # warm-up
    start = time.perf_counter()
    fit_adam(pretrain_model, data["Z"], damping=PRETRAIN_DAMPING,
             n_steps=-(-len(data["Z"][1]) // BATCH), batch_size=BATCH, random_state=1)
    return {"seconds": time.perf_counter() - start}


# Where the EK-FAC run spends its time: (object in skmsif, attribute, label).
PHASES = [
    ("_estimator", "_stationarity", "stationarity check"),
    ("_kfac.KroneckerCurvature", "fit", "K-FAC factors (both stages)"),
    ("_kfac.KroneckerCurvature", "_correct_eigenvalues", "of which EK-FAC eigenvalue passes"),
    ("_estimator._FittedState", "factors", "test gradients + solves + H_WTheta"),
    ("_estimator._FittedState", "directional", "scoring pass over Z"),
]


def worker_ekfac(data, dtype, hessian_samples, matrix):
    """EK-FAC fit + score; with ``matrix``, the (n_matrix, m) influence matrix too."""
    import operator
    import warnings

    import skmsif._estimator
    import skmsif._kfac  # noqa: F401

    timers = Timers()
    for owner, attribute, label in PHASES:
        timers.wrap(operator.attrgetter(owner)(skmsif), attribute, label)
    pretrain_model, finetune_model = load_models()
    if ARGS.finetune_hessian == "ekfac":
        est = estimator(hessian="ekfac", dtype=dtype, hessian_samples=hessian_samples)
    else:  # the head's system by a converged solve (doc/guide/curvature.md says why)
        est = estimator(hessian="ekfac", finetune_hessian=ARGS.finetune_hessian,
                        curvature="gauss_newton", iterative_solver="cg",
                        tol=1e-5 if dtype == "float32" else ARGS.tol, dtype=dtype,
                        hessian_samples=hessian_samples)
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stationarity of briefly trained models: reported
        start = time.perf_counter()
        est.fit(pretrain_model, finetune_model, data["Z"], data["X"])
        result["fit_seconds"] = time.perf_counter() - start
        scores = est.score(data["x_test"])
        result["seconds"] = time.perf_counter() - start
        result["phases"] = {label: timers.seconds.get(label, 0.0) for _, _, label in PHASES}
        result["stationarity"] = {k: v["relative"] for k, v in est.stationarity_.items()}
        if matrix:
            points = ARGS.matrix_factor_points
            x_matrix = tuple(part[:ARGS.n_matrix] for part in data["x_test"])
            start = time.perf_counter()
            factors = est.influence_factors(tuple(part[:points] for part in x_matrix))
            result["factor_seconds_per_point"] = (time.perf_counter() - start) / points
            rows = np.resize(factors, (ARGS.n_matrix, factors.shape[1]))
            start = time.perf_counter()
            block = est.influence_from_factors(rows, data["Z"])
            result["matrix_scoring_seconds"] = time.perf_counter() - start
            result["matrix_shape"] = list(block.shape)
            result["matrix_seconds"] = (result["fit_seconds"] + ARGS.n_matrix
                                        * result["factor_seconds_per_point"]
                                        + result["matrix_scoring_seconds"])
    return result, scores


def fit_and_score(data, **params):
    """Fit ``estimator(**params)`` and score the test set: timings, solves, scores."""
    import warnings

    pretrain_model, finetune_model = load_models()
    est = estimator(hessian_samples=ARGS.hessian_samples, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # residuals are reported
        start = time.perf_counter()
        est.fit(pretrain_model, finetune_model, data["Z"], data["X"])
        fit_seconds = time.perf_counter() - start
        scores = est.score(data["x_test"])
    return {"seconds": time.perf_counter() - start, "fit_seconds": fit_seconds,
            "tol": params.get("tol"), "solves": histories(est)}, scores


def worker_cg(data, dtype):
    return fit_and_score(data, hessian="cg", curvature="gauss_newton",
                         iterative_solver="cg", dtype=dtype,
                         tol=ARGS.tol if dtype == "float64" else 1e-5)


def worker_cg_budget(data, preconditioner):
    """Gauss-Newton CG to ``--budget-tol`` on the pretrain stage, the head exact."""
    return fit_and_score(data, hessian="cg", finetune_hessian="exact",
                         curvature="gauss_newton", iterative_solver="cg", dtype=ARGS.dtype,
                         tol=ARGS.budget_tol, preconditioner=preconditioner)


def worker_lowrank(data, dtype):
    return fit_and_score(data, hessian="lowrank", finetune_hessian="cg",
                         curvature="gauss_newton", iterative_solver="cg", rank=ARGS.rank,
                         dtype=dtype, tol=1e-5)


def worker_kronfluence(data, sampled=False):
    """kronfluence 1.0.1's EK-FAC, single stage, on the pretrain model (its defaults).

    ``sampled``: its factors on the same ``--hessian-samples`` images as ours (the
    estimator's draw), the scores still against all of Z; summed scores only.
    """
    import tempfile
    import warnings

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    pretrain_model, _ = load_models()
    pretrain_model.eval()
    Z = TensorDataset(torch.as_tensor(data["Z"][0]), torch.as_tensor(data["Z"][1]))
    inputs = torch.as_tensor(data["x_test"][0])
    with torch.no_grad():
        predicted = torch.cat([pretrain_model(inputs[s:s + 1024]).argmax(1)
                               for s in range(0, len(inputs), 1024)])
    queries = TensorDataset(inputs, predicted)
    matrix_queries = TensorDataset(inputs[:ARGS.n_matrix], predicted[:ARGS.n_matrix])
    factor_data = Z
    if sampled:
        from sklearn.utils import check_random_state
        from torch.utils.data import Subset

        # The estimator's own draw of hessian_indices_ (random_state=ARGS.seed).
        rows = np.sort(check_random_state(ARGS.seed).choice(len(Z), ARGS.hessian_samples,
                                                            replace=False))
        factor_data = Subset(Z, rows.tolist())
    result = {}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(ARGS.seed)
        start = time.perf_counter()
        model = prepare_model(pretrain_model, ClassificationTask())
        analyzer = Analyzer("bench", model, ClassificationTask(), cpu=True, disable_tqdm=True,
                            output_dir=folder)
        analyzer.fit_all_factors("ekfac", factor_data, per_device_batch_size=BATCH,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        result["factor_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "summed", "ekfac", query_dataset=queries, train_dataset=Z,
            per_device_query_batch_size=BATCH, per_device_train_batch_size=BATCH,
            score_args=ScoreArguments(damping_factor=PRETRAIN_DAMPING,
                                      aggregate_query_gradients=True),
            overwrite_output_dir=True)
        result["score_seconds"] = result["factor_seconds"] + time.perf_counter() - start
        if not ARGS.skip_matrix and not sampled:
            start = time.perf_counter()
            analyzer.compute_pairwise_scores(
                "matrix", "ekfac", query_dataset=matrix_queries, train_dataset=Z,
                per_device_query_batch_size=BATCH, per_device_train_batch_size=BATCH,
                score_args=ScoreArguments(damping_factor=PRETRAIN_DAMPING),
                overwrite_output_dir=True)
            shape = analyzer.load_pairwise_scores("matrix")["all_modules"].shape
            result["matrix_seconds"] = result["factor_seconds"] + time.perf_counter() - start
            result["matrix_shape"] = list(shape)
    return result, None


def run_worker(name):
    data = load_data()
    kinds = {
        "epoch": lambda: (worker_epoch(data), None),
        "ekfac": lambda: worker_ekfac(
            data, ARGS.dtype, ARGS.hessian_samples if ARGS.sampled_only else None,
            not ARGS.skip_matrix),
        "ekfac_sampled": lambda: worker_ekfac(data, ARGS.dtype, ARGS.hessian_samples, False),
        "ekfac_sampled_float64": lambda: worker_ekfac(data, "float64", ARGS.hessian_samples,
                                                      False),
        "cg_float64": lambda: worker_cg(data, "float64"),
        "cg_float32": lambda: worker_cg(data, "float32"),
        "lowrank": lambda: worker_lowrank(data, ARGS.dtype),
        "cg_budget": lambda: worker_cg_budget(data, None),
        "pcg": lambda: worker_cg_budget(data, "ekfac"),
        "kronfluence": lambda: worker_kronfluence(data),
        "kronfluence_sampled": lambda: worker_kronfluence(data, sampled=True),
    }
    kind = name.split("#")[0]
    # Every worker times its own training epoch just before its task, so that each
    # ratio compares two timings taken minutes apart, not an hour apart.
    epoch = worker_epoch(data)["seconds"]
    result, scores = kinds[kind]()
    result["epoch_seconds"] = epoch
    if scores is not None:
        np.save(WORK / f"{name}.npy", scores)
    with open(WORK / f"{name}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def spawn(name):
    """Run worker ``name`` in a subprocess; its result, and its own peak memory."""
    if name in ARGS.reuse.split(","):
        with open(WORK / f"{name}.json", encoding="utf-8") as handle:
            result = json.load(handle)
        result.setdefault("peak_rss_gb", float("nan"))
        scores_path = WORK / f"{name}.npy"
        log(f"{name}: reused from {WORK}")
        return result, np.load(scores_path) if scores_path.is_file() else None
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    command += [arg for arg in sys.argv[1:]]
    log(f"running {name}")
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"worker {name} failed with exit code {process.returncode}")
    with open(WORK / f"{name}.json", encoding="utf-8") as handle:
        result = json.load(handle)
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # kilobytes on Linux
    with open(WORK / f"{name}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    scores_path = WORK / f"{name}.npy"
    scores = np.load(scores_path) if scores_path.is_file() else None
    log(f"{name}: {result.get('seconds', result.get('score_seconds', 0)):.1f} s, peak "
        f"{result['peak_rss_gb']:.2f} GB")
    return result, scores


# --------------------------------------------------------------------------- report

def agreement(scores, reference):
    return {"spearman": float(spearmanr(scores, reference)[0]),
            "pearson": float(pearsonr(scores, reference)[0]),
            "relative_difference": float(np.linalg.norm(scores - reference)
                                         / np.linalg.norm(reference))}


def main():
    from skmsif.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    start_all = time.perf_counter()
    data, accuracy = prepare()
    m, n, t = len(data["Z"][1]), len(data["X"][1]), len(data["x_test"][1])
    n_params = sum(p.numel() for p in load_models()[0].parameters())
    print(f"Fashion-MNIST, Table A CNN ({n_params} pretrain parameters), m = {m}, "
          f"finetune n = {n}, test points = {t}, Case 1; {ARGS.threads} thread(s), "
          f"device {ARGS.device}; passes {ARGS.dtype}; dampings {PRETRAIN_DAMPING:g} / "
          f"{FINETUNE_DAMPING:g}; pretrain train accuracy {accuracy['pretrain_train']:.3f}, "
          f"finetune test accuracy {accuracy['finetune_test']:.3f}", flush=True)

    runs = {}
    order = ["epoch#start", "ekfac"] + ([] if ARGS.sampled_only else ["ekfac_sampled"])
    order += ["cg_budget", "pcg", "cg_float64"]
    if not ARGS.skip_precision:
        order += ["cg_float32", "ekfac_sampled_float64"]
    if not ARGS.skip_lowrank:
        order += ["lowrank"]
    if not ARGS.skip_kronfluence:
        order += ["kronfluence", "kronfluence_sampled"]
    order += ["epoch#end"]
    for name in order:
        runs[name] = spawn(name)
    results = {name: run[0] for name, run in runs.items()}
    scores = {name: run[1] for name, run in runs.items() if run[1] is not None}
    if ARGS.sampled_only:  # one EK-FAC run, its factors on --hessian-samples of Z
        results["ekfac_sampled"], scores["ekfac_sampled"] = results["ekfac"], scores["ekfac"]
    full = (f"factors on {ARGS.hessian_samples} of Z" if ARGS.sampled_only
            else "factors on all of Z")

    epochs = [results["epoch#start"]["seconds"], results["epoch#end"]["seconds"]]
    epoch = float(np.mean(epochs))
    reference = scores["cg_float64"]
    rows = []

    def row(label, seconds, note="", run=None):
        # A run's ratio uses the epoch its own subprocess timed just before it (the
        # machine is shared: two timings minutes apart, not an hour apart).
        rows.append((label, seconds, seconds / own_epoch(run), note))

    def own_epoch(run):
        return results.get(run, {}).get("epoch_seconds", epoch) if run else epoch

    row("training epoch (Adam, batch 128, over Z), mean of start/end", epoch,
        f"start {epochs[0]:.1f} s, end {epochs[1]:.1f} s")
    ek = results["ekfac"]
    phases = ", ".join(f"{k} {v / own_epoch('ekfac'):.2f}" for k, v in ek["phases"].items())
    row(f"(a) EK-FAC score end to end, {full}", ek["seconds"],
        f"target <= 5; in epochs: {phases}", "ekfac")
    eks = results["ekfac_sampled"]
    if not ARGS.sampled_only:  # else the row above
        row(f"(a) EK-FAC score end to end, factors on {ARGS.hessian_samples} of Z",
            eks["seconds"], "target <= 5; in epochs: " + ", ".join(
                f"{k} {v / own_epoch('ekfac_sampled'):.2f}" for k, v in eks["phases"].items()),
            "ekfac_sampled")
    if "matrix_seconds" in ek:
        row(f"(b) ({ARGS.n_matrix}, m) EK-FAC influence, {full}",
            ek["matrix_seconds"],
            f"target <= 20; fit {ek['fit_seconds'] / own_epoch('ekfac'):.2f} + factors "
            f"{ARGS.n_matrix} x {ek['factor_seconds_per_point']:.2f} s (timed on "
            f"{ARGS.matrix_factor_points}) = "
            f"{ARGS.n_matrix * ek['factor_seconds_per_point'] / own_epoch('ekfac'):.2f} + scoring "
            f"{ek['matrix_scoring_seconds'] / own_epoch('ekfac'):.2f}", "ekfac")
        sampled_matrix = (eks["fit_seconds"] + ARGS.n_matrix * ek["factor_seconds_per_point"]
                          + ek["matrix_scoring_seconds"])
        if not ARGS.sampled_only:
            row(f"(b) same, factors on {ARGS.hessian_samples} of Z (its fit + the above)",
                sampled_matrix, "target <= 20", "ekfac")
    for name, label in (("cg_budget", "Gauss-Newton CG"),
                        ("pcg", "Gauss-Newton CG, EK-FAC preconditioner")):
        run = results[name]
        row(f"(a) {label} to residual {run['tol']:g}, head exact, on "
            f"{ARGS.hessian_samples} of Z", run["seconds"],
            f"fit {run['fit_seconds'] / own_epoch(name):.2f}; pretrain "
            f"{run['solves']['pretrain']['n_iter']} iterations, residual "
            f"{run['solves']['pretrain']['residual']:.2f}", name)
    cg = results["cg_float64"]
    row("Gauss-Newton CG reference, float64", cg["seconds"],
        f"tol {cg['tol']:g}; " + "; ".join(
            f"{stage} {v['n_iter']} iterations, residual {v['residual']:.1e}"
            for stage, v in cg["solves"].items()), "cg_float64")
    if "kronfluence" in results:
        kr = results["kronfluence"]
        row("(d) kronfluence EK-FAC, aggregated query (single stage)", kr["score_seconds"],
            f"factors {kr['factor_seconds'] / own_epoch('kronfluence'):.2f}; ours (a)/theirs = "
            f"{ek['seconds'] / kr['score_seconds']:.2f}x (target <= 1.0x); factors on "
            f"{ARGS.hessian_samples}: {eks['seconds'] / kr['score_seconds']:.2f}x",
            "kronfluence")
        if "matrix_seconds" in kr and "matrix_seconds" in ek:
            row(f"(d) kronfluence EK-FAC, {ARGS.n_matrix} queries x m", kr["matrix_seconds"],
                f"ours (b)/theirs = {ek['matrix_seconds'] / kr['matrix_seconds']:.2f}x "
                "(target <= 1.0x)", "kronfluence")
    if "kronfluence_sampled" in results:
        krs = results["kronfluence_sampled"]
        row(f"(d) kronfluence EK-FAC, factors on the same {ARGS.hessian_samples} of Z",
            krs["score_seconds"],
            f"factors {krs['factor_seconds'] / own_epoch('kronfluence_sampled'):.2f}; ours (a), factors on "
            f"{ARGS.hessian_samples}/theirs = {eks['seconds'] / krs['score_seconds']:.2f}x; "
            f"budgeted GN-CG/theirs = "
            f"{results['cg_budget']['seconds'] / krs['score_seconds']:.2f}x",
            "kronfluence_sampled")
    if "lowrank" in results:
        row(f"(g) low rank {ARGS.rank}, Gauss-Newton, factors on {ARGS.hessian_samples}",
            results["lowrank"]["seconds"], run="lowrank")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement'.ljust(width)}  {'seconds':>9}  {'epochs':>7}  notes")
    for label, seconds, ratio, note in rows:
        print(f"{label.ljust(width)}  {seconds:9.1f}  {ratio:7.2f}  {note}")

    print("\nAgreement of the summed scores (all m pretrain examples) with the Gauss-Newton "
          "CG reference (float64)")
    comparisons = [(f"(c) EK-FAC, {full}", "ekfac"),
                   (f"(c) EK-FAC, factors on {ARGS.hessian_samples} of Z", "ekfac_sampled"),
                   (f"(c) Gauss-Newton CG to residual {ARGS.budget_tol:g}", "cg_budget"),
                   ("(c) same, EK-FAC preconditioner", "pcg"),
                   ("(f) Gauss-Newton CG, float32 passes", "cg_float32"),
                   (f"(g) low rank {ARGS.rank}", "lowrank")]
    if ARGS.sampled_only:
        comparisons = comparisons[1:]
    report = {}
    for label, name in comparisons:
        if name in scores:
            report[name] = agreement(scores[name], reference)
            print(f"  {label:<40} Spearman {report[name]['spearman']:.4f}  Pearson "
                  f"{report[name]['pearson']:.4f}  relative difference "
                  f"{report[name]['relative_difference']:.2e}")

    if not ARGS.skip_precision:
        print("\n(f) Precision: float32 against float64 passes")
        pairs = [("EK-FAC, factors on " + str(ARGS.hessian_samples), "ekfac_sampled",
                  "ekfac_sampled_float64"),
                 ("Gauss-Newton CG", "cg_float32", "cg_float64")]
        for label, f32, f64 in pairs:
            agree = agreement(scores[f32], scores[f64])
            report[f"precision {label}"] = agree
            print(f"  {label:<28} time float32 {results[f32]['seconds'] / own_epoch(f32):6.2f} epochs, "
                  f"float64 {results[f64]['seconds'] / own_epoch(f64):6.2f} epochs; relative "
                  f"difference {agree['relative_difference']:.2e}, Spearman "
                  f"{agree['spearman']:.6f}")

    print("\nEach run's own epoch (s): " + ", ".join(
        f"{name} {result['epoch_seconds']:.1f}" for name, result in results.items()
        if "epoch_seconds" in result))
    print("\n(e) Peak resident memory per subprocess (GB): " + ", ".join(
        f"{name} {result['peak_rss_gb']:.2f}" for name, result in results.items()))
    total = time.perf_counter() - start_all
    print(f"\nTotal {total:.0f} s. Threads {ARGS.threads}; CUDA path not measured.")
    if ARGS.json:
        with open(ARGS.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(ARGS), "epoch_seconds": epochs, "results": results,
                       "agreement": report, "rows": rows}, handle, indent=1, default=str)


if __name__ == "__main__":
    if ARGS.worker:
        run_worker(ARGS.worker)
    else:
        main()
