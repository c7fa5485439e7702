"""Progress bars, shown only when the user asked for ``verbose``."""

from tqdm.auto import tqdm


def progress(iterable, verbose, total=None, desc=None):
    """Wrap ``iterable`` in a tqdm bar when ``verbose`` is truthy, else return it."""
    if not verbose:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)
