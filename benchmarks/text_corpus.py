"""A reproducible corpus for the embedding benchmark: documents of 8 to 256 tokens, long-tailed.

Token lengths are log-normal (median ``median`` tokens, most documents short, a tail to the
model's 256), clipped to 8..256, each exact: a document is ``[CLS] w1 ... wk [SEP]`` where every
word is one whole-word entry of the model's own WordPiece vocabulary, drawn with Zipf weights over
the vocabulary's order (BERT's is roughly by frequency: "the", "of", "and" come first), so byte
lengths per token are those of ordinary English (about 4 to 6 bytes a token). The same seed
gives the same corpus on any machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Corpus", "make_corpus"]

_WORD = re.compile(r"^[a-z]{1,12}$")
FIRST_WORD_ID = 1996  # bert-base-uncased's vocab: [PAD], [unused*], [CLS], [SEP], [MASK], characters, then words


@dataclass(frozen=True, slots=True)
class Corpus:
    texts: list[str]
    tokens: list[int]  # each text's token count with [CLS] and [SEP]

    def describe(self) -> dict[str, float]:
        tokens = np.asarray(self.tokens)
        nbytes = np.asarray([len(t.encode()) for t in self.texts])
        return {"texts": len(self.texts), "tokens_total": int(tokens.sum()),
                "tokens_mean": round(float(tokens.mean()), 1),
                "tokens_p50": float(np.percentile(tokens, 50)), "tokens_p90": float(np.percentile(tokens, 90)),
                "tokens_p99": float(np.percentile(tokens, 99)), "tokens_min": int(tokens.min()),
                "tokens_max": int(tokens.max()),
                "bytes_per_token": round(float(nbytes.sum() / np.maximum(tokens - 2, 1).sum()), 2)}


def make_corpus(model_dir: Path, n: int, *, seed: int = 16, median: float = 40.0, sigma: float = 0.8,
                low: int = 8, high: int = 256) -> Corpus:
    """``n`` documents whose token counts (with the two special tokens) follow the mix above."""
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in vocab[FIRST_WORD_ID:] if _WORD.match(w)]
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    weights = 1.0 / ranks
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)
    texts = []
    for length in lengths:
        picked = rng.choice(len(words), size=int(length) - 2, p=weights)
        texts.append(" ".join(words[i] for i in picked))
    return Corpus(texts, [int(k) for k in lengths])
