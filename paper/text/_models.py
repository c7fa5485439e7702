"""The small BERT-style classifiers of the text problem (``transformers``, built from a config).

Pretrain model: ``BertForSequenceClassification`` = encoder ``bert`` (word, position and
type embeddings, transformer layers, pooler: the shared ``W``) + ``classifier`` (the
pretrain head ``U``). Finetune model: the same class with a new ``classifier``
(``Theta``) and, for Case 1 ("fixed"), the very same ``bert`` module object; for Case 2
("updated"), a deep copy of it, matched to the pretrain encoder by the name prefix
``"bert"``.

The configuration is ``transformers``' default except for the sizes and
``layer_norm_eps`` (see the package docstring): attention is the default implementation
(SDPA), and dropout keeps its default probabilities. Every loss in this package is
computed in eval mode (no dropout), as the estimator does.
"""

import copy

import torch
from transformers import BertConfig, BertForSequenceClassification

SHARED_PREFIX = "bert"


def make_config(vocab_size, n_labels, *, hidden_size, num_hidden_layers, num_attention_heads,
                intermediate_size, max_length, layer_norm_eps, pad_token_id=0):
    """A ``BertConfig`` of the given size (one token type; positions = ``max_length``)."""
    return BertConfig(layer_norm_eps=layer_norm_eps,
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_length, type_vocab_size=1, pad_token_id=pad_token_id,
        num_labels=n_labels)


def make_pretrain_model(config, seed, dtype=torch.float64):
    """A freshly initialised pretrain classifier (torch's global generator untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.to(dtype).eval()


def make_finetune_model(pretrain_model, n_labels, case, seed):
    """A finetune classifier on the pretrained encoder, with a new, freshly initialised head.

    ``case="fixed"``: the finetune model holds the pretrain model's ``bert`` module
    itself (the same parameter objects). ``"updated"``: a deep copy of it.
    """
    config = copy.deepcopy(pretrain_model.config)
    config.num_labels = n_labels
    config.id2label = {k: f"LABEL_{k}" for k in range(n_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    dtype = next(pretrain_model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The model's own encoder is built and dropped: only its head is kept.
        model = BertForSequenceClassification(config)
    model.bert = (pretrain_model.bert if case == "fixed"
                  else copy.deepcopy(pretrain_model.bert))
    return model.to(dtype).eval()


def head_parameters(model):
    """The task-specific parameters: everything outside the encoder."""
    return [p for name, p in model.named_parameters()
            if not name.startswith(SHARED_PREFIX + ".")]


def encoder_parameters(model):
    """The encoder's parameters ``W`` (name prefix ``"bert"``), in order."""
    return [p for name, p in model.named_parameters()
            if name.startswith(SHARED_PREFIX + ".")]
