"""Blind indexes: normalization, exact and starts-with hashes, kinds kept apart, key custody."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from carevault.config import Settings
from carevault.crypto.blind_index import BlindIndex, InvalidIndexKind, normalize
from carevault.crypto.custody import KeyCustody
from carevault.runtime import Services, ensure_key_material

NAME = "Patient.name"


@pytest.fixture
def index(tmp_path: Path) -> BlindIndex:
    settings = Settings(data_dir=tmp_path / "var")
    ensure_key_material(settings)
    return BlindIndex(KeyCustody.from_settings(settings).index_prf())


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("José", "jose"),
        ("JOSE", "jose"),
        ("jose", "jose"),
        ("  Anna \t\n Maria  ", "anna maria"),
        ("Müller", "muller"),
        ("Zoë Ångström", "zoe angstrom"),
        ("Straße", "strasse"),
        ("İstanbul", "istanbul"),
        ("ＡＢＣ１２３", "abc123"),  # fullwidth forms
        ("e\u0301", "e"),  # already decomposed
        ("Ǆemal", "dzemal"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected
    assert BlindIndex.normalize(raw) == expected


def test_exact_ignores_case_accents_and_spacing(index: BlindIndex) -> None:
    variants = ["José", "JOSE", "jose", "Jose\u0301", " josé ", "JOSÉ"]
    hashes = {index.exact(NAME, v) for v in variants}
    assert len(hashes) == 1
    (digest,) = hashes
    assert len(digest) == 43 and re.fullmatch(r"[A-Za-z0-9_-]{43}", digest)
    assert index.exact(NAME, "Anna  Maria") == index.exact(NAME, "anna maria")
    assert index.exact(NAME, "Jose") != index.exact(NAME, "Josef")
    assert "jose" not in digest.lower()


def test_kinds_are_separate(index: BlindIndex) -> None:
    assert index.exact("Patient.name", "1970-01-01") != index.exact(
        "Patient.birthdate", "1970-01-01"
    )
    assert set(index.prefixes("Patient.name", "Smith")).isdisjoint(
        index.prefixes("Patient.family", "Smith")
    )
    # exact and prefix hashes are different families, even for the whole value
    assert index.exact(NAME, "smith") not in index.prefixes(NAME, "smith")
    assert index.query(NAME, "smith") in index.prefixes(NAME, "smith")


@pytest.mark.parametrize("kind", ["", "a\x00b", "x\x01", "tab\t"])
def test_control_characters_in_kinds_are_refused(index: BlindIndex, kind: str) -> None:
    with pytest.raises(InvalidIndexKind):
        index.exact(kind, "x")
    with pytest.raises(InvalidIndexKind):
        index.prefixes(kind, "x")


def test_prefixes_give_fhir_starts_with_search(index: BlindIndex) -> None:
    stored = set(index.prefixes(NAME, "Anna María Smith-Jones"))

    def matches(query: str) -> bool:
        return index.query(NAME, query) in stored

    for hit in (
        "ann",
        "ANNA",
        "mar",
        "Mari",
        "MARÍA",
        "maria",
        "smi",
        "smith",
        "jon",
        "jones",
        "anna m",
        "Anna  María",
        "anna maria smith-jones",
        "anna maria sm",
    ):
        assert matches(hit), hit
    for miss in (
        "an",
        "nna",
        "ria",
        "mith",
        "annam",
        "maria anna",
        "smithj",
        "x",
        "anna maria smith-jones x",
    ):
        assert not matches(miss), miss
    assert all(len(h) == 43 for h in stored)
    assert len(index.prefixes(NAME, "Anna María Smith-Jones")) == len(stored)  # no duplicates
    assert index.prefixes(NAME, "x y") == sorted(index.prefixes(NAME, "x y"))


def test_short_words_match_only_whole(index: BlindIndex) -> None:
    stored = set(index.prefixes(NAME, "Li Wu"))
    assert index.query(NAME, "li") in stored and index.query(NAME, "WU") in stored
    assert index.query(NAME, "l") not in stored and index.query(NAME, "w") not in stored
    assert index.query(NAME, "li wu") in stored
    # a one-character value is still findable by itself
    assert index.query(NAME, "q") in set(index.prefixes(NAME, "Q"))


def test_every_prefix_of_three_or_more(index: BlindIndex) -> None:
    stored = set(index.prefixes(NAME, "Alexander"))
    word = "alexander"
    for n in range(1, len(word) + 1):
        assert (index.query(NAME, word[:n]) in stored) == (n >= 3), n
    assert len(stored) == len(word) - 2


def test_long_values_are_indexed_up_to_the_limit(index: BlindIndex) -> None:
    short = BlindIndex(index._prf, max_prefix_length=8)
    value = "abcdefghijklmnop"
    stored = set(short.prefixes(NAME, value))
    assert short.query(NAME, "abcdefgh") in stored
    # a longer query is truncated the same way: it finds the candidate, which the caller
    # then confirms by decrypting
    assert short.query(NAME, value) in stored
    assert short.query(NAME, "abcdefghZZZ") in stored


async def test_same_key_same_hash_across_instances(
    services: Services, settings: Settings, instances, tmp_path: Path
) -> None:
    other = await instances(settings)
    value = "Zoë Ångström"
    assert services.blind_index.exact(NAME, value) == other.blind_index.exact(NAME, value)
    assert services.blind_index.prefixes(NAME, value) == other.blind_index.prefixes(NAME, value)
    # another installation (another index key) gives unrelated hashes
    foreign = Settings(data_dir=tmp_path / "foreign")
    ensure_key_material(foreign)
    stranger = BlindIndex(KeyCustody.from_settings(foreign).index_prf())
    assert stranger.exact(NAME, value) != services.blind_index.exact(NAME, value)
    assert set(stranger.prefixes(NAME, value)).isdisjoint(
        services.blind_index.prefixes(NAME, value)
    )
