"""Which parameters are shared between the two models, and flat views of them.

Notation follows ``doc/guide/influence.md``: ``W`` are the parameters the pretrain and the
finetune model share (the embedding), ``U`` the pretrain-only head, ``Theta`` the
finetune-only head.
"""

import torch


def _matches(name, prefixes):
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def find_shared(pretrain_model, finetune_model, shared=None):
    """Pair up the shared parameters ``W`` of the two models.

    Parameters
    ----------
    pretrain_model, finetune_model : torch.nn.Module
        The two models.
    shared : None, str or list of str
        ``None``: the parameters that are the very same ``torch.nn.Parameter`` objects in
        both models. A string or a list of strings: name prefixes (a whole dotted component,
        so ``"0"`` matches ``"0.weight"`` but not ``"01.weight"``); a parameter is shared
        when its name starts with one of them in both models.

    Returns
    -------
    pairs : list of (str, str)
        ``(name in pretrain_model, name in finetune_model)`` for every shared parameter, in
        the pretrain model's parameter order.

    Raises
    ------
    ValueError
        When no parameter is shared, when a prefix matches in one model only, or when the
        matched parameters differ in name or shape between the models.
    """
    pre = dict(pretrain_model.named_parameters())
    fin = dict(finetune_model.named_parameters())
    if shared is None:
        by_id = {id(p): name for name, p in fin.items()}
        pairs = [(name, by_id[id(p)]) for name, p in pre.items() if id(p) in by_id]
        if not pairs:
            raise ValueError(
                "shared=None found no parameter object that belongs to both pretrain_model "
                "and finetune_model. When the finetune model holds its own copy of the "
                "embedding (embedding='updated'), pass shared='<name prefix>' (for example "
                "shared='embedding'); the parameter names of pretrain_model are: "
                f"{sorted(pre)[:10]}"
            )
        return pairs

    prefixes = [shared] if isinstance(shared, str) else list(shared)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(
            f"shared={shared!r} is not valid: pass None, a non-empty name prefix or a list "
            "of non-empty name prefixes."
        )
    pre_names = [name for name in pre if _matches(name, prefixes)]
    fin_names = [name for name in fin if _matches(name, prefixes)]
    for prefix in prefixes:
        in_pre = any(_matches(n, [prefix]) for n in pre)
        in_fin = any(_matches(n, [prefix]) for n in fin)
        if not (in_pre and in_fin):
            where = "either model" if not (in_pre or in_fin) else (
                "finetune_model" if in_pre else "pretrain_model")
            raise ValueError(
                f"shared prefix {prefix!r} matches no parameter in {where}. Parameter "
                f"names: pretrain_model {sorted(pre)[:10]}, finetune_model "
                f"{sorted(fin)[:10]}."
            )
    if sorted(pre_names) != sorted(fin_names):
        raise ValueError(
            f"shared={shared!r} is ambiguous: it matches {sorted(pre_names)} in "
            f"pretrain_model but {sorted(fin_names)} in finetune_model. The shared "
            "embedding must have the same parameter names in both models; pass prefixes "
            "that select exactly the embedding."
        )
    for name in pre_names:
        if pre[name].shape != fin[name].shape:
            raise ValueError(
                f"shared parameter {name!r} has shape {tuple(pre[name].shape)} in "
                f"pretrain_model but {tuple(fin[name].shape)} in finetune_model; shared="
                f"{shared!r} must select the same embedding in both models."
            )
    if len(pre_names) == len(pre):
        raise ValueError(
            f"shared={shared!r} selects every parameter of pretrain_model; the pretrain "
            "model needs a head of its own (U) besides the shared embedding (W)."
        )
    return [(name, name) for name in pre_names]


def flatten(tensors):
    """Concatenate a sequence of tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector, shapes):
    """Split a flat vector (or a batch of them, last dimension) into tensors of ``shapes``."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    lead = vector.shape[:-1]
    pieces = torch.split(vector, sizes, dim=-1)
    return [piece.reshape(*lead, *shape) for piece, shape in zip(pieces, shapes)]
