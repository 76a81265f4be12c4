"""Tiny Llama and CLIP tokenizers (and text encoders) built offline, for tiny HunyuanVideo pipelines.

The real HunyuanVideo text stack (Llava-Llama-3-8B + CLIP ViT-L/14) cannot be downloaded in tests or the
quickstart, and transformers 5 rebuilds a ``LlamaTokenizer`` / ``CLIPTokenizer`` from ``tokenizer.json`` with its
own fixed architecture (Llama: Metaspace + byte-fallback BPE; CLIP: lower-case byte-level BPE with ``</w>``).
So the BPE vocabularies here are estimated in memory with the ``tokenizers`` library *in exactly that
architecture* and handed to the transformers classes as ``vocab``/``merges``; a saved tokenizer then loads back
with identical ids through ``from_pretrained`` (what ``HunyuanVideoPipeline.from_pretrained`` does).

The Llama vocabulary is sized so that the prefix of HunyuanVideo's prompt template (everything before the user
prompt) is exactly ``crop_start`` tokens long (95, like the real Llama-3 tokenizer): the pipeline's crop then
removes exactly the template, and prompt lengths (hence text padding masks) behave as with the real model.

The tiny T5-family encoder of the Wan (UMT5) and Mochi (T5) pipelines is built here too, over the tokenizer of
:mod:`train.tiny.t5_tokenizer`.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    PreTrainedModel,
)

__all__ = [
    "CAPTION_WORDS",
    "LLAMA_SPECIAL_TOKENS",
    "tiny_llama_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_llama_model",
    "tiny_clip_text_model",
    "tiny_t5_encoder",
    "TINY_T5_SIZES",
]

#: Words of the short captions the synthetic data set and validation prompts use (part of both corpora).
CAPTION_WORDS: tuple[str, ...] = tuple(
    (
        "a an the cat dog car person man woman child bird boat train horse fish ball kite square circle bars "
        "walks runs drives flies swims rides sails bounces rotates slides moves rises falls zooms pans "
        "on in at of with through over under across along behind near from to and "
        "grass city street road beach sea lake river sky forest mountain hill desert park field window "
        "night day morning sunset sunrise autumn winter red blue green yellow white black orange bright dark "
        "small large slow slowly fast busy quiet calm wet sandy snowy camera close-up wide shot realistic "
        "cinematic pattern gradient checkerboard background moving colored"
    ).split()
)

#: Llama-3 style special tokens (the HunyuanVideo prompt template uses the header and eot tokens).
LLAMA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<pad>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_LLAMA_ADDED = LLAMA_SPECIAL_TOKENS[4:]


def _bpe_vocab_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def _train_llama_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Trained per word (split=True) so that no merge spans a word boundary; applied by LlamaTokenizer with
    # split=False, exactly like SentencePiece-converted Llama tokenizers.
    tok = Tokenizer(models.BPE(fuse_unk=True, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    vocab, merges = _bpe_vocab_merges(tok)
    for byte in range(256):  # byte fallback: any character tokenizes without <unk>
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return vocab, merges


def _wrap_llama(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> LlamaTokenizer:
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",  # HunyuanVideo's mask logic assumes valid text tokens first
        model_max_length=model_max_length,
        additional_special_tokens=list(_LLAMA_ADDED),
    )


def tiny_llama_tokenizer(
    template_prefix: Optional[str] = None,
    *,
    crop_start: Optional[int] = None,
    corpus: Optional[Iterable[str]] = None,
    model_max_length: int = 512,
) -> LlamaTokenizer:
    """A small Llama tokenizer (BOS added, right padding, Llama-3 header/eot special tokens).

    With ``template_prefix`` and ``crop_start``, the BPE vocabulary size is searched (deterministically) so that
    ``template_prefix`` tokenizes to exactly ``crop_start`` ids; ValueError if no size in range does.
    """
    lines = [" ".join(CAPTION_WORDS)] + list(corpus or [])
    if template_prefix is not None:
        lines.insert(0, template_prefix)
    if (template_prefix is None) != (crop_start is None):
        raise ValueError("template_prefix and crop_start must be given together")
    if template_prefix is None:
        vocab, merges = _train_llama_bpe(lines, 400)
        return _wrap_llama(vocab, merges, model_max_length)
    lengths: dict[int, int] = {}

    def length(size: int) -> int:
        if size not in lengths:
            vocab, merges = _train_llama_bpe(lines, size)
            lengths[size] = len(_wrap_llama(vocab, merges, model_max_length)(template_prefix).input_ids)
        return lengths[size]

    # More merges -> fewer tokens (non-increasing): bisect for the first size at or below crop_start.
    lo, hi = 200, 800
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) <= crop_start:
            hi = mid
        else:
            lo = mid + 1
    for size in range(lo, min(lo + 16, 801)):
        if length(size) == crop_start:
            vocab, merges = _train_llama_bpe(lines, size)
            return _wrap_llama(vocab, merges, model_max_length)
        if length(size) < crop_start:
            break
    raise ValueError(
        f"crop_start={crop_start}: no tiny Llama vocabulary tokenizes the template prefix to exactly that many "
        f"tokens (lengths seen: {sorted(set(lengths.values()))})"
    )


def tiny_clip_tokenizer(*, corpus: Optional[Iterable[str]] = None, vocab_size: int = 400) -> CLIPTokenizer:
    """A small CLIP tokenizer (``<|startoftext|>`` ... ``<|endoftext|>``, pad = eos, max length 77)."""
    # A byte-level vocabulary with merges only for whole caption words, built in a fixed order: the `tokenizers`
    # BPE trainer breaks frequency ties differently from run to run, which made tiny pipelines irreproducible.
    words = sorted({w.lower() for line in [" ".join(CAPTION_WORDS), *(corpus or [])] for w in line.split() if w.isalpha()})
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte, also as a word end: nothing maps to unk
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words[: max(0, vocab_size)]:
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):  # left-to-right merges build the word, the last one with </w>
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merged = piece + nxt
            if merged not in vocab:
                merges.append((piece, nxt))
                vocab[merged] = len(vocab)
            piece = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_llama_model(vocab_size: int, hidden_size: int, *, num_layers: int = 3, max_positions: int = 512) -> LlamaModel:
    """Random-weight LlamaModel; HunyuanVideo reads hidden_states[-3], so at least 2 layers are needed."""
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 (the pipeline skips the last 2 hidden states), got {num_layers}")
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaModel(cfg).eval()


def tiny_clip_text_model(
    vocab_size: int, hidden_size: int, *, bos_token_id: int, eos_token_id: int, pad_token_id: int
) -> CLIPTextModel:
    """Random-weight CLIPTextModel; its pooled output (at the first eos) has ``hidden_size`` features."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(cfg).eval()


#: Sizes of the tiny T5-family text encoders: 32-d (the tiny transformers' text_dim), one layer, two heads.
TINY_T5_SIZES: dict[str, int] = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def tiny_t5_encoder(model_cls: type[PreTrainedModel], tokenizer: Any, **config: Any) -> PreTrainedModel:
    """Random-weight ``model_cls`` (``UMT5EncoderModel`` for Wan, ``T5EncoderModel`` for Mochi) of
    :data:`TINY_T5_SIZES` over ``tokenizer``'s ids, in eval mode; ``config`` adds to its config."""
    cfg = model_cls.config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **TINY_T5_SIZES,
        **config,
    )
    return model_cls(cfg).eval()
