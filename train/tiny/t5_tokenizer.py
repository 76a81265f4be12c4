"""Small T5-style tokenizers built offline, for tiny random-weight pipelines.

Tests and the quickstart cannot download ``google/umt5-xxl`` or ``t5-v1_1-xxl``, and no tokenizer file ships
inside a PyPI package, so a SentencePiece-like Unigram model is estimated in memory with the ``tokenizers``
library from a fixed caption corpus and wrapped as a ``T5TokenizerFast``. The result round-trips through
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like a Hub tokenizer, so a saved pipeline folder loads
with the pipeline's own ``from_pretrained``. Training is deterministic: the same arguments give the same vocabulary.
"""

from __future__ import annotations

import math
import os
import string
from collections import Counter
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5TokenizerFast

# Short captions of the kind the synthetic data set and the validation prompts use.
DEFAULT_CORPUS: tuple[str, ...] = (
    "a cat walks slowly across the green grass",
    "a red car drives down a wet street at night",
    "waves crash on a sandy beach at sunset",
    "a person rides a bicycle through a busy city",
    "a dog runs after a ball in the park",
    "clouds move over snowy mountains in the morning",
    "a bird flies above a calm blue lake",
    "a train passes through a forest in autumn",
    "the camera pans left over a field of flowers",
    "the camera zooms in on a bright moving square",
    "a white circle bounces on a dark background",
    "colored bars slide from left to right",
    "a small boat sails on the open sea",
    "rain falls on a window while lights blink outside",
    "a woman walks along a quiet road with trees",
    "smoke rises from a chimney on a cold day",
    "a child plays with a kite on a windy hill",
    "fish swim in clear water near the rocks",
    "a horse gallops through a dusty desert",
    "the sun rises behind tall buildings",
    "a checkerboard pattern rotates slowly",
    "a gradient shifts from blue to orange",
    "two balls collide and roll apart",
    "fireworks explode over a river at night",
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
_MARK = "\u2581"  # SentencePiece word-boundary marker (what Metaspace inserts)
_ALPHABET = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)


def train_unigram(
    corpus: Optional[Iterable[str]] = None,
    *,
    vocab_size: int = 256,
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    unk_token: str = "<unk>",
) -> Tokenizer:
    """A SentencePiece-style (Metaspace + Unigram) ``tokenizers.Tokenizer`` estimated in memory from ``corpus``.

    Pieces: the special tokens, the word-boundary marker, every printable ASCII character (so any ASCII prompt
    tokenizes without ``<unk>``), then the most frequent corpus words as whole pieces. Scores are smoothed log
    frequencies. The piece list is built and sorted here rather than by ``UnigramTrainer``, whose ties and last
    score bits change from run to run: the same arguments always give the same ids (reproducible tiny pipelines).
    """
    specials = list(special_tokens)
    if unk_token not in specials:
        raise ValueError(f"unk_token {unk_token!r} must be one of special_tokens {specials}")
    lines = list(DEFAULT_CORPUS if corpus is None else corpus)
    if not lines:
        raise ValueError("corpus is empty: give at least one line of text")
    minimum = len(specials) + 1 + len(_ALPHABET)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (specials + ASCII alphabet), got {vocab_size}")

    words = Counter(_MARK + w for line in lines for w in line.split())
    chars = Counter(c for line in lines for c in line if not c.isspace())
    chars[_MARK] = sum(words.values())
    total = sum(words.values()) + sum(chars.values()) + len(_ALPHABET) + 1
    score = lambda n: math.log((n + 1) / total)  # noqa: E731  (add-one smoothing: unseen characters stay usable)

    pieces = {c: score(chars[c]) for c in [_MARK, *_ALPHABET]}
    ranked = sorted((w for w in words if len(w) > 2), key=lambda w: (-words[w], w))
    for w in ranked[: vocab_size - len(specials) - len(pieces)]:
        pieces[w] = score(words[w])
    ordered = sorted(pieces.items(), key=lambda ps: (-ps[1], ps[0]))
    vocab = [(t, 0.0) for t in specials] + ordered
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk_token), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(specials)
    return tok


def tiny_t5_tokenizer(
    *, vocab_size: int = 256, model_max_length: int = 32, corpus: Optional[Iterable[str]] = None
) -> PreTrainedTokenizerFast:
    """A ``T5TokenizerFast`` (pad id 0, eos ``</s>`` appended, no extra ids) like UMT5's / T5 v1.1's.

    ``model_max_length`` is what the adapters read as the text length of the tiny model (the real Wan uses 512).
    """
    tok = train_unigram(corpus, vocab_size=vocab_size)
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def save_tiny_t5_tokenizer(out_dir: str | os.PathLike, **kwargs) -> PreTrainedTokenizerFast:
    """Build :func:`tiny_t5_tokenizer` and ``save_pretrained`` it into ``out_dir`` (a pipeline's ``tokenizer/``)."""
    tokenizer = tiny_t5_tokenizer(**kwargs)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
