"""Sensitive labels (access/labels.py): the code counts only under the right code system."""

from __future__ import annotations

from typing import Any

import pytest

from carevault.access.labels import (
    ACT_CODE,
    ALL_LABELS,
    CONFIDENTIALITY,
    index_keys,
    labels_of_codings,
    sensitive_labels,
)


def resource(*codings: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "meta": {"security": list(codings)}}


def test_issue_labels_are_known() -> None:
    # the issue's list: PSY, HIV, SUD (42 CFR Part 2), ETH, SEX and R (restricted)
    assert {"PSY", "HIV", "SUD", "ETH", "SEX", "R"} <= ALL_LABELS
    assert ACT_CODE == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert CONFIDENTIALITY == "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


@pytest.mark.parametrize("code", ["PSY", "HIV", "SUD", "ETH", "SEX"])
def test_act_code_labels(code: str) -> None:
    assert sensitive_labels(resource({"system": ACT_CODE, "code": code})) == {code}


@pytest.mark.parametrize("code", ["R", "V"])
def test_confidentiality_labels(code: str) -> None:
    assert sensitive_labels(resource({"system": CONFIDENTIALITY, "code": code})) == {code}


@pytest.mark.parametrize(
    "coding",
    [
        {"code": "PSY"},  # no system
        {"system": None, "code": "PSY"},
        {"system": "", "code": "PSY"},
        {"system": "http://example.org/local-labels", "code": "PSY"},
        {"system": "http://example.org/local-labels", "code": "R"},
        {"system": ACT_CODE, "code": "R"},  # R is a Confidentiality code, not ActCode
        {"system": CONFIDENTIALITY, "code": "PSY"},  # PSY is ActCode, not Confidentiality
        {"system": ACT_CODE.upper(), "code": "PSY"},
        {"system": ACT_CODE + "/", "code": "PSY"},
        {"system": "urn:oid:2.16.840.1.113883.5.4", "code": "PSY"},
        {"system": ACT_CODE, "code": "psy"},  # codes are case-sensitive
        {"system": ACT_CODE, "code": " PSY"},
        {"system": CONFIDENTIALITY, "code": "N"},  # normal: not sensitive
        {"system": CONFIDENTIALITY, "code": "M"},
        {"system": ACT_CODE, "code": ["PSY"]},  # not a string: no label, no crash
        {"system": ACT_CODE, "code": {"c": 1}},
        {"system": ACT_CODE, "code": None},
        {"system": ["x"], "code": "PSY"},
        {"system": ACT_CODE, "display": "psychotherapy"},
    ],
)
def test_wrong_or_missing_system_does_not_count(coding: dict[str, Any]) -> None:
    assert sensitive_labels(resource(coding)) == frozenset()


def test_several_labels_and_noise() -> None:
    res = resource(
        {"system": ACT_CODE, "code": "HIV"},
        {"system": "http://example.org", "code": "SUD"},
        {"system": CONFIDENTIALITY, "code": "R"},
        {"system": CONFIDENTIALITY, "code": "N"},
        "not a coding",
        None,
        {"system": ACT_CODE, "code": "HIV"},
    )
    assert sensitive_labels(res) == {"HIV", "R"}


@pytest.mark.parametrize(
    "res",
    [
        {},
        {"meta": None},
        {"meta": "x"},
        {"meta": {}},
        {"meta": {"security": None}},
        {"meta": {"security": {"system": ACT_CODE, "code": "PSY"}}},  # not a list
        {"meta": {"security": []}},
        {"meta": {"tag": [{"system": ACT_CODE, "code": "PSY"}]}},  # tags are not labels
        {"security": [{"system": ACT_CODE, "code": "PSY"}]},  # not under meta
    ],
)
def test_no_labels(res: dict[str, Any]) -> None:
    assert sensitive_labels(res) == frozenset()


def test_labels_of_codings() -> None:
    assert labels_of_codings([(ACT_CODE, "SUD"), (CONFIDENTIALITY, "V"), ("x", "HIV")]) == {
        "SUD",
        "V",
    }
    assert labels_of_codings([(None, "PSY"), (ACT_CODE, None)]) == frozenset()


def test_index_keys() -> None:
    assert index_keys("PSY") == (f"{ACT_CODE}|PSY",)
    assert index_keys("R") == (f"{CONFIDENTIALITY}|R",)
    assert index_keys("N") == ()
    for label in ALL_LABELS:
        (key,) = index_keys(label)
        system, _, code = key.rpartition("|")
        assert labels_of_codings([(system, code)]) == {label}
