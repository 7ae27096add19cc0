"""FHIR OperationOutcome bodies for errors, with fixed, generic texts.

Every error response of the FHIR API carries an OperationOutcome built here. The helpers for
the common cases use fixed texts only: nothing from the request, the stored record or an
exception message goes into an outcome, so errors cannot leak PHI or reveal whether a record
exists. In particular `forbidden_as_not_found()` is byte-for-byte `not_found()`: a read the
caller may not make must look exactly like a read of a record that does not exist (DESIGN.md,
invariant 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from carevault.fhir.validation import FhirValidationError, Issue

NOT_FOUND_TEXT = "Resource not found"
GONE_TEXT = "Resource has been deleted"
CONFLICT_TEXT = "Version conflict: the resource has changed"
PRECONDITION_TEXT = "Precondition failed: the resource version does not match"
PROCESSING_TEXT = "The request could not be processed"
INVALID_REQUEST_TEXT = "The request is not valid"
NOT_SUPPORTED_TEXT = "The requested operation is not supported"


def operation_outcome(issues: Iterable[Issue | Mapping[str, Any]]) -> dict[str, Any]:
    """An OperationOutcome JSON dict with one ``issue`` per `Issue` (or mapping with the same
    keys: severity, code, diagnostics, optional expression)."""
    rendered: list[dict[str, Any]] = []
    for issue in issues:
        if isinstance(issue, Issue):
            severity, code = issue.severity, issue.code
            diagnostics, expression = issue.diagnostics, issue.expression
        else:
            severity, code = issue.get("severity", "error"), issue["code"]
            diagnostics, expression = issue.get("diagnostics"), issue.get("expression")
        item: dict[str, Any] = {"severity": severity, "code": code}
        if diagnostics:
            item["diagnostics"] = diagnostics
        if expression:
            item["expression"] = [expression]
        rendered.append(item)
    if not rendered:  # an OperationOutcome needs at least one issue
        rendered.append({"severity": "error", "code": "exception", "diagnostics": PROCESSING_TEXT})
    return {"resourceType": "OperationOutcome", "issue": rendered}


def _single(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    return operation_outcome([{"severity": severity, "code": code, "diagnostics": text}])


def not_found() -> dict[str, Any]:
    """404: no such resource (or version)."""
    return _single("not-found", NOT_FOUND_TEXT)


def forbidden_as_not_found() -> dict[str, Any]:
    """The outcome for a read the caller is not allowed to make: identical to `not_found()`,
    so that a denial does not reveal that the record exists."""
    return not_found()


def gone() -> dict[str, Any]:
    """410: the resource existed and was deleted (only for callers allowed to see it)."""
    return _single("deleted", GONE_TEXT)


def conflict() -> dict[str, Any]:
    """409: a concurrent change won (e.g. a version-aware update lost the race)."""
    return _single("conflict", CONFLICT_TEXT)


def precondition_failed() -> dict[str, Any]:
    """412: If-Match named a version that is not the current one."""
    return _single("conflict", PRECONDITION_TEXT)


def processing_error() -> dict[str, Any]:
    """500: an internal failure; deliberately says nothing about the cause."""
    return _single("exception", PROCESSING_TEXT, severity="fatal")


def invalid_request() -> dict[str, Any]:
    """400: a malformed request (bad search parameter, bad header, ...)."""
    return _single("invalid", INVALID_REQUEST_TEXT)


def not_supported() -> dict[str, Any]:
    """400/405/501: an interaction, type or parameter carevault does not support."""
    return _single("not-supported", NOT_SUPPORTED_TEXT)


def validation_failed(error: FhirValidationError) -> dict[str, Any]:
    """400/422: the issues of a failed `validate_resource` (their texts are generic)."""
    return operation_outcome(error.issues)
