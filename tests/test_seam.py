"""Every data form gives the numbers of plain tensors; data are streamed; factors shard.

The canonical computation is the estimator on ``(inputs, targets)`` float64 tensors; each
other form (dict Datasets, Mappings, DataLoaders, Datasets generated on the fly) must
give the same influence to 1e-12, and scoring from factors over shards of ``Z`` must give
``score`` and ``influence`` to 1e-10.
"""

import numpy as np
import pytest
import torch
from _models import tiny_problem
from torch import nn

from skmsif import MultiStageInfluenceEstimator
from skmsif._backends import Backend
from skmsif._data import as_source

torch.set_num_threads(1)


class KeywordModel(nn.Module):
    """A model called as ``model(**batch)``, as a ``transformers`` model is."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, features, scale):
        return self.module(features * scale[:, None])


class PairDataset(torch.utils.data.Dataset):
    """Generated on the fly; fails loudly when indexed at or beyond ``len()``."""

    def __init__(self, inputs, targets, as_dict=False):
        self.inputs, self.targets, self.as_dict = inputs, targets, as_dict

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise AssertionError(f"indexed at {index}, beyond len() = {len(self)}")
        if self.as_dict:
            return {"features": self.inputs[index], "scale": torch.tensor(1.0,
                    dtype=torch.float64), "labels": self.targets[index]}
        return self.inputs[index], self.targets[index]


def _forms(data):
    """The same examples as a pair, a Dataset, a Mapping, a dict Dataset, DataLoaders."""
    inputs, targets = data
    ones = torch.ones(len(targets), dtype=torch.float64)
    mapping = {"features": inputs, "scale": ones, "labels": targets}
    return {
        "pair": (inputs, targets),
        "numpy pair": (inputs.numpy(), targets.numpy()),
        "dataset": PairDataset(inputs, targets),
        "mapping": mapping,
        "dict dataset": PairDataset(inputs, targets, as_dict=True),
        "loader": torch.utils.data.DataLoader(PairDataset(inputs, targets), batch_size=7),
        "dict loader": torch.utils.data.DataLoader(PairDataset(inputs, targets, True),
                                                   batch_size=6),
    }


KEYWORD_FORMS = {"mapping", "dict dataset", "dict loader"}


@pytest.fixture(scope="module", params=["fixed", "updated"])
def canonical(request):
    case = request.param
    pretrain, finetune, Z, X, x_test = tiny_problem(case)
    estimator = MultiStageInfluenceEstimator(
        embedding=case, hessian="exact", finetune_damping=1e-3, alpha=0.1,
        shared=None if case == "fixed" else "0", batch_size=4)
    estimator.fit(pretrain, finetune, Z, X)
    return case, (pretrain, finetune, Z, X, x_test), estimator, estimator.influence(x_test)


@pytest.mark.parametrize("form", ["numpy pair", "dataset", "mapping", "dict dataset",
                                  "loader", "dict loader"])
def test_every_data_form_gives_the_numbers_of_tensors(canonical, form):
    case, (pretrain, finetune, Z, X, x_test), reference, expected = canonical
    if form in KEYWORD_FORMS:
        pretrain, finetune = KeywordModel(pretrain), KeywordModel(finetune)
        shared = None if case == "fixed" else "module.0"
    else:
        shared = reference.shared
    estimator = MultiStageInfluenceEstimator(**{**reference.get_params(), "shared": shared})
    estimator.fit(pretrain, finetune, _forms(Z)[form], _forms(X)[form])
    got = estimator.influence(_forms(x_test)[form])
    # A DataLoader batches differently, so sums run in another order: 1e-11 of the norm.
    assert np.linalg.norm(got - expected) <= 1e-11 * np.linalg.norm(expected)
    scores = estimator.score(_forms(x_test)[form])
    assert np.linalg.norm(scores - expected.sum(0)) <= 1e-11 * np.linalg.norm(expected)


def test_a_generated_dataset_is_read_by_index_within_len():
    """A Dataset that never raises IndexError is read within len(), one batch at a time."""
    _, _, Z, _, _ = tiny_problem()
    dataset = PairDataset(*Z)
    source = as_source(dataset, "Z", torch.float64)
    seen = [len(targets) for _, targets in source.batches(6, torch.device("cpu"))]
    assert seen == [6, 6, 6, 2]


def test_factors_over_shards_equal_score_and_influence(canonical, tmp_path):
    _, (_, _, Z, _, x_test), estimator, expected = canonical
    factors = estimator.influence_factors(x_test)
    summed = estimator.influence_factors(x_test, summed=True)
    assert factors.shape == (len(x_test[1]), sum(estimator.n_params_[k] for k in "WU"))
    assert summed.shape == (1, factors.shape[1])
    np.save(tmp_path / "factors.npy", factors)
    loaded = np.load(tmp_path / "factors.npy")
    inputs, targets = Z
    shards = [(inputs[start:start + 7], targets[start:start + 7])
              for start in range(0, len(targets), 7)]
    pieces = np.concatenate([estimator.influence_from_factors(loaded, shard)
                             for shard in shards], axis=1)
    np.testing.assert_allclose(pieces, expected, rtol=1e-10, atol=1e-14)
    scores = np.concatenate([estimator.influence_from_factors(summed, shard)
                             for shard in shards], axis=1)[0]
    np.testing.assert_allclose(scores, estimator.score(x_test), rtol=1e-10, atol=1e-14)


def test_factors_of_the_wrong_shape_are_refused(canonical):
    _, (_, _, Z, _, x_test), estimator, _ = canonical
    with pytest.raises(ValueError, match="factors must have shape"):
        estimator.influence_from_factors(np.zeros((2, 3)), Z)


def test_a_new_backend_is_one_class_and_its_registration():
    """The estimator has no backend branches: a registered class is usable by name."""

    class Doubling(Backend, name="test-doubling"):
        def solve(self, rhs):
            return 0.5 * rhs

    try:
        pretrain, finetune, Z, X, x_test = tiny_problem()
        identity = MultiStageInfluenceEstimator(hessian="identity").fit(
            pretrain, finetune, Z, X).score(x_test)
        estimator = MultiStageInfluenceEstimator(hessian="test-doubling")
        got = estimator.fit(pretrain, finetune, Z, X).score(x_test)
        # Case 1: I = -v2 . g with v2 = 0.5 (g_W - H_WTheta 0.5 g_Theta).
        assert np.isfinite(got).all() and not np.allclose(got, identity)
    finally:
        del Backend.registry["test-doubling"]
    with pytest.raises(ValueError, match="registered backend"):
        MultiStageInfluenceEstimator(hessian="test-doubling").fit(pretrain, finetune, Z, X)


def test_a_shuffling_loader_and_iterables_of_unknown_length_are_refused():
    _, _, Z, _, _ = tiny_problem()
    loader = torch.utils.data.DataLoader(PairDataset(*Z), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        as_source(loader, "Z", torch.float64)
    with pytest.raises(TypeError, match="unknown length"):
        as_source(iter([Z]), "Z", torch.float64)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield Z[0][0], Z[1][0]

    with pytest.raises(TypeError, match="IterableDataset"):
        as_source(Stream(), "Z", torch.float64)


def test_a_mapping_without_labels_names_the_key():
    with pytest.raises(ValueError, match="'labels'.*label_key"):
        as_source({"input_ids": torch.zeros(3, 2)}, "Z", torch.float64)
