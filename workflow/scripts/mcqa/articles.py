"""One key for an article wherever two articles are compared: the split into training and validation, the
folds, and the leak guard of the extra sources. Two spellings of one article get one key, so they are never
on two sides of a split, and a copy of a training or test article in an extra source is found."""

from __future__ import annotations

import functools
import unicodedata


@functools.cache
def _to_simplified():
    import opencc

    return opencc.OpenCC("t2s")


def article_key(article: str) -> str:
    """The article in one canonical form: Unicode NFKC (full-width forms folded), Simplified script (OpenCC
    t2s: 臺/台, 裡/裏 and the like become one character), lower case, and without whitespace or punctuation
    (「」 against “”, 。 against .)."""
    text = _to_simplified().convert(unicodedata.normalize("NFKC", article)).casefold()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch)[0] in "PZ"))


# Two articles whose keys share at least this Jaccard similarity of 5-character shingles are one article
# told twice: on AI.xlsx, a Simplified copy of every article (OpenCC t2s) converted back with s2twp, with
# 「」 turned into “”, keeps the key of 4,482 of 5,626 articles; the other 1,144 (s2twp's phrases: 物件 for
# 對象, 裝置 for 設備) share 0.34 to 1.0 of their shingles with the original (median 0.94), all but one at
# least 0.5.
NEAR_COPY_JACCARD = 0.5
SHINGLE_CHARACTERS = 5


def shingles(key: str) -> set[str]:
    """The overlapping SHINGLE_CHARACTERS-character pieces of an article's key (the key itself if shorter)."""
    n = SHINGLE_CHARACTERS
    return {key[i: i + n] for i in range(len(key) - n + 1)} or {key}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearCopies:
    """Finds, among known article keys, those that share at least NEAR_COPY_JACCARD of their shingles with a
    new one: MinHash signatures in an LSH index (datasketch) propose candidates, whose Jaccard similarity is
    then computed exactly."""

    def __init__(self, keys: list[str]):
        from datasketch import MinHashLSH

        self.keys = keys
        self.shingles = [shingles(key) for key in keys]
        self.index = MinHashLSH(threshold=NEAR_COPY_JACCARD, num_perm=128)
        for n, pieces in enumerate(self.shingles):
            self.index.insert(n, self._signature(pieces))

    @staticmethod
    def _signature(pieces: set[str]):
        from datasketch import MinHash

        signature = MinHash(num_perm=128, seed=1)
        signature.update_batch([piece.encode() for piece in sorted(pieces)])
        return signature

    def nearest(self, key: str) -> tuple[int, float] | None:
        """The known key most similar to `key` at or above the threshold (its index and Jaccard), or None."""
        pieces = shingles(key)
        scored = [(jaccard(pieces, self.shingles[n]), n) for n in self.index.query(self._signature(pieces))]
        best = max((s for s in scored if s[0] >= NEAR_COPY_JACCARD), default=None)
        return (best[1], best[0]) if best else None
