"""A CLIP tokenizer generated in code, for presets that run without downloaded weights.

The layout mirrors OpenAI CLIP's vocabulary: ids 0..255 are the 256 byte-level characters (so ``!`` is id 0,
the pad token of SDXL's second tokenizer), 256..511 the same characters with the end-of-word suffix ``</w>``,
then merges, and the two specials last (``<|startoftext|>`` = vocab_size-2, ``<|endoftext|>`` = vocab_size-1; for
vocab_size 49408 that is CLIP's 49406/49407). The merges are generated deterministically (letter bigrams first),
so tokenization is real BPE and ``"a photo of a cat"`` yields several tokens, but the ids do not match CLIP's:
this tokenizer is for random-weight models only.

transformers 5.x builds ``CLIPTokenizer`` from in-memory ``vocab=`` (dict) and ``merges=`` (list of pairs);
the 4.x ``vocab_file=``/``merges_file=`` arguments are ignored there, so they are not used.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer

__all__ = ["BOS", "EOS", "EOW", "byte_chars", "make_clip_tokenizer", "vocab_and_merges"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
_MIN_VOCAB = 2 * 256 + 2


@lru_cache(maxsize=1)
def byte_chars() -> tuple[str, ...]:
    """GPT-2/CLIP byte-to-unicode table, in CLIP's vocabulary order (printable bytes first)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    order = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            codes.append(256 + n)
            n += 1
    mapping = dict(zip(order, codes, strict=True))
    # CLIP's vocab.json lists characters in the order of bytes_to_unicode's values.
    return tuple(chr(mapping[b]) for b in order)


@lru_cache(maxsize=4)
def vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary dict and merge list of a byte-level BPE with exactly ``vocab_size`` entries."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes, 256 end-of-word bytes, 2 specials)")
    chars = byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + EOW] = len(vocab)
    # Merge priority: lowercase letters first so common words compress, then the rest in vocabulary order.
    letters = [c for c in chars if "a" <= c <= "z"]
    priority = letters + [c for c in chars if c not in letters]
    n_merges = vocab_size - len(vocab) - 2
    merges: list[tuple[str, str]] = []
    done = n_merges == 0
    for first in priority:
        if done:
            break
        for second in priority:
            for right in (second + EOW, second):  # word endings first: "a", "of" become single tokens early
                merged = first + right
                if merged in vocab:
                    continue
                merges.append((first, right))
                vocab[merged] = len(vocab)
                if len(merges) == n_merges:
                    done = True
                    break
            if done:
                break
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    return vocab, tuple(merges)


def make_clip_tokenizer(vocab_size: int, *, pad_token: str = EOS, max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with ``vocab_size`` ids, padding with ``pad_token`` (SDXL: eos, then ``"!"``)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(vocab_size)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the generated vocabulary")
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # pairs, as tokenizers' BPE takes them (not str)
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=max_length,
    )
