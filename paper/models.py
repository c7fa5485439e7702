"""The networks of the paper reproduction: an MLP for the 8x8 digits, the paper's CNN.

Each factory returns ``(embedding, pretrain_model, finetune_model)``: two
``Sequential(embedding, head)`` models that hold the *same* embedding object (Case 1 of
the paper; for Case 2 give the finetune model a deep copy). Initial weights are seeded
without touching torch's global generator.

* :func:`make_digits_mlp`: ``Linear(64, hidden) + Tanh`` and linear heads, float64, for
  :func:`skmsif.datasets.load_digits_split`.
* :func:`make_mnist_cnn`: the paper's Table A "MNIST" network, for
  :func:`skmsif.datasets.fashion_mnist_split`.
* :func:`make_turnover_mlp`: the digits MLP with its embedding under turn-over masks
  (:class:`skmsif.turnover.TurnOverDropout`), for the turn-over comparison.
"""

import torch
from torch import nn

from skmsif.turnover import TurnOverDropout

__all__ = ["make_digits_mlp", "make_mnist_cnn", "make_turnover_mlp", "MASK_SEED"]

MASK_SEED = 0  # mask family of the turn-over embedding



def make_digits_mlp(hidden=16, *, n_inputs=64, n_pretrain_classes=4, n_finetune_classes=6,
                    seed=0, dtype=torch.float64):
    """A one-hidden-layer MLP for the 8x8 digits: ``Linear(64, hidden) + Tanh`` embedding.

    Parameters
    ----------
    hidden : int, default=16
        Width of the embedding.
    n_inputs : int, default=64
        Input features.
    n_pretrain_classes, n_finetune_classes : int
        Outputs of the two linear task heads.
    seed : int, default=0
        Seeds the initialisation (torch's global generator is left as it was).
    dtype : torch.dtype, default=torch.float64
        Dtype of the parameters.

    Returns
    -------
    embedding, pretrain_model, finetune_model : torch.nn.Module
        ``pretrain_model = Sequential(embedding, head)`` and likewise ``finetune_model``;
        both hold the *same* embedding object (Case 1). For Case 2 give the finetune
        model a deep copy: ``Sequential(copy.deepcopy(embedding), finetune_model[1])``.

    See Also
    --------
    skmsif.datasets.load_digits_split : The data these models are for.

    Examples
    --------
    >>> import copy
    >>> import torch
    >>> from paper.models import make_digits_mlp
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=8, seed=0)
    >>> inputs = torch.zeros(5, 64, dtype=torch.float64)
    >>> pretrain_model(inputs).shape, finetune_model(inputs).shape
    (torch.Size([5, 4]), torch.Size([5, 6]))
    >>> finetune_model[0] is embedding, embedding[0].weight.dtype
    (True, torch.float64)
    >>> case2_model = torch.nn.Sequential(copy.deepcopy(embedding), finetune_model[1])
    >>> case2_model[0] is embedding
    False
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = nn.Sequential(nn.Linear(n_inputs, hidden), nn.Tanh())
        pretrain_head = nn.Linear(hidden, n_pretrain_classes)
        finetune_head = nn.Linear(hidden, n_finetune_classes)
    pretrain_model = nn.Sequential(embedding, pretrain_head).to(dtype)
    finetune_model = nn.Sequential(embedding, finetune_head).to(dtype)
    return embedding, pretrain_model, finetune_model


def make_mnist_cnn(n_pretrain_classes=4, n_finetune_classes=6, seed=0, *,
                   dtype=torch.float32):
    """The paper's Table A "MNIST" network, for inputs of shape ``(N, 1, 28, 28)``.

    Embedding: ``CONV 32 5x5 + 1``, ``MAX-POOL 2x2 + 2``, ``CONV 64 5x5 + 1``,
    ``MAX-POOL 2x2 + 2``, Tanh activations, flattened to 1,024 features; task heads
    ``FC <#classes>`` without activation. Max-pooling is applied before each Tanh: Tanh
    is increasing, so ``pool(tanh(x)) == tanh(pool(x))`` and the network is the same
    function at a quarter of the Tanh evaluations.

    Parameters
    ----------
    n_pretrain_classes, n_finetune_classes : int
        Outputs of the two heads.
    seed : int, default=0
        Seeds the initialisation (torch's global generator is left as it was).
    dtype : torch.dtype, default=torch.float32
        Dtype of the parameters.

    Returns
    -------
    embedding, pretrain_model, finetune_model : torch.nn.Module
        ``Sequential(embedding, head)`` each, sharing the embedding object (Case 1); for
        Case 2 deep-copy the embedding into the finetune model.

    Examples
    --------
    >>> import torch
    >>> from paper.models import make_mnist_cnn
    >>> embedding, pretrain_model, finetune_model = make_mnist_cnn()
    >>> pretrain_model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 4])
    >>> finetune_model[0] is embedding
    True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=1), nn.MaxPool2d(2, stride=2), nn.Tanh(),
            nn.Conv2d(32, 64, kernel_size=5, stride=1), nn.MaxPool2d(2, stride=2), nn.Tanh(),
            nn.Flatten())
        pretrain_head = nn.Linear(64 * 4 * 4, n_pretrain_classes)
        finetune_head = nn.Linear(64 * 4 * 4, n_finetune_classes)
    pretrain_model = nn.Sequential(embedding, pretrain_head).to(dtype)
    finetune_model = nn.Sequential(embedding, finetune_head).to(dtype)
    return embedding, pretrain_model, finetune_model


def make_turnover_mlp(hidden=16, *, seed=0, mask_seed=MASK_SEED):
    """:func:`make_digits_mlp` with the embedding under turn-over masks.

    The embedding is ``TurnOverDropout(Sequential(Linear(64, hidden), Tanh()))``: the mask
    acts on the hidden units after the activation, as standard dropout does. Both models
    share it; the initial weights equal those of ``make_digits_mlp(hidden, seed=seed)``.

    Parameters
    ----------
    hidden : int, default=16
        Number of hidden units of the embedding.
    seed : int, default=0
        Seeds the initial weights, as in :func:`make_digits_mlp`.
    mask_seed : int, default=MASK_SEED
        Mask family of the turn-over embedding (see
        :class:`skmsif.turnover.TurnOverDropout`).

    Returns
    -------
    embedding : skmsif.turnover.TurnOverDropout
        The shared embedding under turn-over masks.
    pretrain_model : torch.nn.Sequential
        The embedding followed by the pretrain head (digits 0-3).
    finetune_model : torch.nn.Sequential
        The same embedding object followed by the finetune head (digits 4-9).

    Examples
    --------
    >>> from paper.models import make_digits_mlp, make_turnover_mlp
    >>> embedding, pretrain_model, finetune_model = make_turnover_mlp(8, seed=3)
    >>> type(embedding).__name__, finetune_model[0] is embedding
    ('TurnOverDropout', True)
    >>> _, plain, _ = make_digits_mlp(8, seed=3)
    >>> all(bool((a == b).all()) for a, b in zip(pretrain_model.parameters(),
    ...                                          plain.parameters()))
    True
    """
    plain, pretrain_plain, finetune_plain = make_digits_mlp(hidden, seed=seed)
    embedding = TurnOverDropout(plain, seed=mask_seed)
    pretrain_model = nn.Sequential(embedding, pretrain_plain[1])
    finetune_model = nn.Sequential(embedding, finetune_plain[1])
    return embedding, pretrain_model, finetune_model
