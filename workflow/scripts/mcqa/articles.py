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
