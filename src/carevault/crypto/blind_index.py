"""Keyed blind indexes: search PHI (names, birth dates, identifiers) without storing it.

The database holds only PRF outputs (tink HMAC-SHA256 PRF, the key in `keys/index.json`) of
normalized values; to search, the server computes the same PRF of the normalized query and looks
the hash up. Without the index key a dump reveals neither values nor prefixes; what it does
reveal is equality (two rows with the same hash share the value) and, for prefix indexes, shared
prefixes - the price of searching at all. Candidates found through an index are confirmed by
decrypting the record when exact semantics matter.

`kind` names what is indexed (e.g. ``"Patient.name"``, ``"Patient.birthdate"``); it is part of
the PRF input, so equal values of different kinds hash differently and cannot be joined.

FHIR's default string search is case- and accent-insensitive "starts with" on the value or any
of its words (``name=smi`` matches "Smith", ``name=jose`` matches "José", ``name=mar`` matches
"Anna Maria"). `prefixes` stores that as a set of hashes per value: each word's prefixes of
length >= 3 (words shorter than 3 characters whole), and the whole value's prefixes of length
>= 3. A query matches when `query(kind, q)` is in the set; queries of 1-2 characters match whole
short words only (prefix search over 1-2 letters would reveal too much for too little).
Values are indexed up to `max_prefix_length` characters; `query` truncates the same way, so a
longer query still finds its candidates (which the caller then confirms).
"""

from __future__ import annotations

import base64
import re
import unicodedata

from tink import prf

HASH_BYTES = 32  # 43 characters of base64url
MIN_PREFIX = 3
_WORD = re.compile(r"\w+")

# PRF input = kind + separator + normalized value; distinct separators keep the exact and the
# prefix families apart (a kind may not contain control characters, so neither can collide).
_EXACT = "\x00"
_PREFIX = "\x01"


class InvalidIndexKind(ValueError):
    """A kind that is empty or contains control characters."""


def normalize(value: str) -> str:
    """Compatibility-decompose (NFKD), drop accents and other combining marks, casefold,
    collapse runs of whitespace to one space, and trim: " JOSÉ  Müller " -> "jose muller"."""
    text = _strip_marks(unicodedata.normalize("NFKD", value)).casefold()
    # casefold can produce new decomposable characters (e.g. from "İ"): decompose once more.
    text = _strip_marks(unicodedata.normalize("NFKD", text))
    return " ".join(text.split())


def _strip_marks(text: str) -> str:
    return "".join(ch for ch in text if not unicodedata.combining(ch))


class BlindIndex:
    """Blind-index hashes under one PRF (`KeyCustody.index_prf()`)."""

    def __init__(self, prf_primitive: prf.Prf, max_prefix_length: int = 64) -> None:
        self._prf = prf_primitive
        self._max = max_prefix_length

    @staticmethod
    def normalize(value: str) -> str:
        return normalize(value)

    def exact(self, kind: str, value: str) -> str:
        """Hash of the normalized value, for equality search (43 characters, base64url)."""
        return self._hash(kind, _EXACT, normalize(value))

    def prefixes(self, kind: str, value: str) -> list[str]:
        """Hashes to store for starts-with search on the value and each of its words (sorted,
        without duplicates); see the module docstring for which prefixes these are."""
        text = normalize(value)[: self._max]
        found: set[str] = set()
        if text:
            found.add(text)
            found.update(text[:n] for n in range(MIN_PREFIX, len(text) + 1))
        for word in _WORD.findall(text):
            found.add(word)
            found.update(word[:n] for n in range(MIN_PREFIX, len(word) + 1))
        # rstrip: a prefix that ends in a space equals, after query normalization, the one before
        return sorted({self._hash(kind, _PREFIX, item.rstrip()) for item in found})

    def query(self, kind: str, value: str) -> str:
        """The hash to look up among stored `prefixes` for a starts-with search of `value`."""
        return self._hash(kind, _PREFIX, normalize(value)[: self._max].rstrip())

    def _hash(self, kind: str, separator: str, text: str) -> str:
        if not kind or any(unicodedata.category(ch) == "Cc" for ch in kind):
            raise InvalidIndexKind("an index kind is non-empty and has no control characters")
        digest = self._prf.compute((kind + separator + text).encode(), HASH_BYTES)
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
