"""Validation of incoming FHIR resources against the fhir.resources R4B models.

`validate_resource` is the only way a client-supplied body becomes something carevault stores:
it checks the body structurally (JSON object, known resourceType, no unknown elements, right
types, valid primitive formats such as dates, required elements present, one value per choice
element) and returns the model's own JSON export, so that what is stored is exactly what was
validated (coerced values normalized, nulls and empty arrays dropped).

Errors are reported as FHIR issues (`Issue`) inside `FhirValidationError`. An issue names the
element (`expression`, e.g. ``Patient.name[0].given``) and carries a fixed, generic
`diagnostics` text chosen from the error *kind*; the offending value is never copied into it,
because request bodies are PHI. (pydantic errors carry the input: we ask pydantic to leave it
out and never use its messages.) Element names from the body do appear in `expression`, since
the client needs to know which element was rejected; names are not values and are
length-limited and sanitized.

Inline binary content (every ``base64Binary`` element: ``Attachment.data`` anywhere in a
resource, contained resources and extensions included, ``Binary.data``, ``Signature.data``...)
is checked after the models: it must be strict base64 (RFC 4648; white space between groups is
allowed, as FHIR's base64Binary pattern allows it) that decodes to exactly the bytes the models
decoded (the library's decoder silently drops data after a padding character), and decode to at
most `max_attachment_bytes` bytes (`Settings.fhir_max_attachment_bytes`). `FhirValidationError`
then carries `status`: 400 for content that is not base64, 413 for content over the limit.

The check is structural only, as far as the library goes: terminology bindings (e.g. that
``gender`` is one of male/female/other/unknown), invariants written in FHIRPath and profiles
are not checked.

Models are R4B (4.3.0), the closest fhir.resources has to R4 (4.0.1); for the clinical and
administrative resources carevault serves the two agree.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Literal

from fhir.resources.R4B import fhirtypes, get_fhir_model_class
from fhir.resources.R4B.domainresource import DomainResource
from fhir.resources.R4B.resource import Resource
from fhir_core.types import FhirBase
from pydantic import BaseModel, ValidationError

from carevault.config import Settings
from carevault.fhir.resource_types import RESOURCE_TYPES

if TYPE_CHECKING:
    from fhir_core.fhirabstractmodel import FHIRAbstractModel

SUPPORTED_TYPES: Final = RESOURCE_TYPES

Severity = Literal["fatal", "error", "warning", "information"]
IssueCode = Literal[
    "structure", "required", "value", "invariant", "not-supported", "invalid", "too-long"
]

# Containers (objects + arrays) deeper than this are refused before the models see them: real
# resources stay far below it (a transaction Bundle holding a Questionnaire with 20 nested item
# levels is ~50 deep), and the models recurse on the Python stack (~6 frames per level).
MAX_DEPTH: Final = 100
# At most this many issues are reported: enough to act on, and a hostile body cannot make
# the OperationOutcome (and the work of building it) as large as itself.
MAX_ISSUES: Final = 100
# Element names in `expression` are cut to this length; FHIR names are far shorter.
_MAX_NAME = 64
# Decoded bytes of one inline base64Binary element (Attachment.data, Binary.data, ...), when the
# caller does not pass the configured limit: the setting's own default, so that a caller that
# forgets to pass it still gets a limit.
_SETTING = Settings.model_fields["fhir_max_attachment_bytes"]
DEFAULT_MAX_ATTACHMENT_BYTES: Final[int] = _SETTING.default

_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_ELEMENT_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9]*$")
# Keys the library accepts but that are not FHIR (library artifacts): refused like any
# unknown element instead of being silently dropped or stored.
_NON_FHIR_KEYS = frozenset({"resource_type", "fhir_comments"})


@dataclass(frozen=True, slots=True)
class Issue:
    """One FHIR OperationOutcome issue: severity, issue-type code, FHIRPath-like element
    path (or None for the whole body) and a generic, input-free diagnostics text."""

    severity: Severity
    code: IssueCode
    diagnostics: str
    expression: str | None = None


class FhirValidationError(Exception):
    """The body is not a valid FHIR resource; `issues` says why (never echoing values).

    `status` is the HTTP status the problem itself calls for, or None where the caller decides
    (400 for a body that is not a JSON object, otherwise 422): 400 when some base64Binary
    content is not base64 (it cannot be parsed at all), else 413 when some inline binary
    content is over the size limit."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("FHIR resource failed validation")
        self.issues = issues

    @property
    def status(self) -> int | None:
        if any(issue.diagnostics == _TEXT_BASE64 for issue in self.issues):
            return 400
        if any(issue.code == "too-long" for issue in self.issues):
            return 413
        return None


# Generic texts, one per kind of problem. They are the only diagnostics we emit.
_TEXT_NOT_OBJECT = "The body must be a JSON object"
_TEXT_NO_TYPE = "resourceType is required"
_TEXT_BAD_TYPE = "resourceType must be a string"
_TEXT_UNSUPPORTED = "Unknown or unsupported resource type"
_TEXT_MISMATCH = "resourceType does not match the resource type of the request"
_TEXT_UNKNOWN = "Unknown element"
_TEXT_REQUIRED = "Required element is missing"
_TEXT_WRONG_TYPE = "Element has the wrong JSON type"
_TEXT_NULL = "null is not allowed here"
_TEXT_VALUE = "Element value is not valid for its type"
_TEXT_CHOICE_MULTI = "Only one type may be given for a choice element"
_TEXT_CHOICE_MISSING = "A required choice element is missing"
_TEXT_INVARIANT = "Element does not satisfy a FHIR invariant"
_TEXT_EMPTY = "Elements must have a value or children (ele-1)"
_TEXT_TOO_DEEP = "The resource is nested too deeply"
_TEXT_NOT_JSON = "Value is not a JSON value"
_TEXT_NON_FINITE = "Numbers must be finite"
_TEXT_INVALID = "The resource could not be validated"
_TEXT_BASE64 = "Invalid base64 content"
_TEXT_TOO_LARGE = "Inline binary content is larger than this server accepts"
_TEXT_RANGE = "Number is out of range"
_TEXT_ID = "Resource ids are 1 to 64 characters"


def validate_resource(
    body: object,
    expected_type: str | None = None,
    *,
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES,
) -> dict[str, Any]:
    """Validate a parsed JSON body as a FHIR resource and return its normalized JSON dict.

    `expected_type`, when given (e.g. from the URL ``/fhir/Patient``), must equal the body's
    resourceType. Raises FhirValidationError (and nothing else) for any invalid input,
    including non-objects, unknown types, excessive nesting, non-finite numbers, content that
    is not strict base64 in a base64Binary element and inline binary content that decodes to
    more than `max_attachment_bytes` bytes (each element on its own).
    """
    if not isinstance(body, dict):
        raise FhirValidationError([_issue("structure", _TEXT_NOT_OBJECT)])
    if "resourceType" not in body:
        raise FhirValidationError([_issue("required", _TEXT_NO_TYPE, "resourceType")])
    resource_type = body["resourceType"]
    if not isinstance(resource_type, str):
        raise FhirValidationError([_issue("structure", _TEXT_BAD_TYPE, "resourceType")])
    if expected_type is not None and resource_type != expected_type:
        raise FhirValidationError([_issue("invalid", _TEXT_MISMATCH, "resourceType")])
    model = model_class(resource_type)
    if model is None:
        # the type name itself is not echoed: it is client text like any other value
        raise FhirValidationError([_issue("not-supported", _TEXT_UNSUPPORTED, "resourceType")])

    try:
        issues = _prescan(body, resource_type)
        if issues:
            raise FhirValidationError(issues)
        instance = model.model_validate(body)
        issues = _check_binary(instance, body, resource_type, max_attachment_bytes)
        if issues:
            raise FhirValidationError(issues)
        # The library's own JSON-mode export (FHIR element order, `_field` siblings, base64
        # and dates as FHIR strings, nulls and empty arrays dropped); it is the same document
        # as model_dump_json() (tested), and cheaper than serializing and parsing that.
        return instance.model_dump(mode="json")
    except FhirValidationError:
        raise
    except ValidationError as exc:
        raise FhirValidationError(_issues_from_pydantic(exc, resource_type)) from None
    except RecursionError:
        raise FhirValidationError([_issue("structure", _TEXT_TOO_DEEP)]) from None
    except Exception:  # noqa: BLE001 - library bugs on odd input (KeyError, TypeError...)
        # Deliberately without the cause: library messages may quote the input.
        raise FhirValidationError([_issue("invalid", _TEXT_INVALID)]) from None


def is_supported_type(resource_type: str) -> bool:
    """True when `resource_type` names a concrete FHIR resource type the models know."""
    return model_class(resource_type) is not None


@lru_cache(maxsize=512)
def model_class(resource_type: str) -> type[FHIRAbstractModel] | None:
    """The R4B model class of a concrete resource type, or None (cached; bounded because
    the argument comes from request bodies)."""
    if not isinstance(resource_type, str) or not _TYPE_NAME.fullmatch(resource_type):
        return None
    try:
        cls = get_fhir_model_class(resource_type)
    except Exception:  # noqa: BLE001 - ValueError for unknown names, ImportError if broken
        return None
    if not (isinstance(cls, type) and issubclass(cls, Resource)):
        return None  # a data type or backbone element, not a resource
    if cls in (Resource, DomainResource) or cls.get_resource_type() != resource_type:
        return None  # abstract bases cannot be instantiated as resources
    return cls


def supported_types() -> frozenset[str]:
    """Every concrete resource type the R4B models define (`resource_types.RESOURCE_TYPES`,
    checked against `derive_resource_types()` by the tests)."""
    return RESOURCE_TYPES


def derive_resource_types() -> frozenset[str]:
    """The concrete resource types, derived from the package: each model registered in
    `fhirtypes` that is a Resource and is not a base of other resources. Loads every model
    class (~5 s in a fresh process)."""
    resource_classes: list[type] = []
    for name in dir(fhirtypes):
        factory = getattr(fhirtypes, name)
        if not (isinstance(factory, type) and issubclass(factory, FhirBase)):
            continue
        if not hasattr(factory, "_model_klass"):
            continue
        try:
            cls = factory.get_model_klass()
        except Exception:  # noqa: BLE001, S112 - an unloadable model is simply not supported
            continue
        if isinstance(cls, type) and issubclass(cls, Resource):
            resource_classes.append(cls)
    abstract = {
        base
        for cls in resource_classes
        for base in cls.__mro__[1:]
        if isinstance(base, type) and issubclass(base, Resource)
    }
    return frozenset(cls.get_resource_type() for cls in resource_classes if cls not in abstract)


# --- pre-scan ----------------------------------------------------------------------------


def _prescan(body: dict[str, Any], resource_type: str) -> list[Issue]:
    """One iterative pass over the raw JSON before the models see it: refuse nesting deeper
    than MAX_DEPTH (the models recurse), non-finite numbers, non-JSON values, non-FHIR keys,
    empty objects (ele-1) and nested resources of unknown types (the library raises KeyError
    or TypeError for those)."""
    issues: list[Issue] = []
    stack: list[tuple[Any, str, int]] = [(body, resource_type, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                return [_issue("structure", _TEXT_TOO_DEEP)]
            if not value and depth > 1:
                issues.append(_issue("invariant", _TEXT_EMPTY, path))
            is_resource = depth == 1 or "resourceType" in value
            if depth > 1 and "resourceType" in value:
                nested = value["resourceType"]
                if not isinstance(nested, str) or model_class(nested) is None:
                    issues.append(
                        _issue("not-supported", _TEXT_UNSUPPORTED, f"{path}.resourceType")
                    )
            for key, child in value.items():
                if not isinstance(key, str):
                    issues.append(_issue("structure", _TEXT_NOT_JSON, path))
                    continue
                if key in _NON_FHIR_KEYS:
                    issues.append(_issue("structure", _TEXT_UNKNOWN, f"{path}.{key}"))
                    continue
                child_path = f"{path}.{_safe_name(key)}"
                if key == "id" and is_resource and isinstance(child, str) and len(child) > 64:
                    issues.append(_issue("value", _TEXT_ID, child_path))  # FHIR id: 1-64 chars
                    continue
                if isinstance(child, dict | list):
                    stack.append((child, child_path, depth + 1))
                else:
                    _check_scalar(child, child_path, issues)
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                return [_issue("structure", _TEXT_TOO_DEEP)]
            for index, child in enumerate(value):
                child_path = f"{path}[{index}]"
                if isinstance(child, dict | list):
                    stack.append((child, child_path, depth + 1))
                else:
                    _check_scalar(child, child_path, issues)
        if len(issues) >= MAX_ISSUES:
            break
    return issues


def _check_scalar(value: Any, path: str, issues: list[Issue]) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            issues.append(_issue("value", _TEXT_NON_FINITE, path))
        return
    issues.append(_issue("structure", _TEXT_NOT_JSON, path))


# --- inline binary content ----------------------------------------------------------------


def _check_binary(instance: BaseModel, raw: dict[str, Any], path: str, limit: int) -> list[Issue]:
    """Issues for the base64Binary elements of a validated resource: not strict base64, or
    over `limit` decoded bytes. Walks the model (so that the element types are the models',
    not guessed from names) side by side with the raw JSON it was validated from (the
    library keeps only the decoded bytes); only the elements the body set are visited."""
    issues: list[Issue] = []
    stack: list[tuple[BaseModel, dict[str, Any], str]] = [(instance, raw, path)]
    while stack and len(issues) < MAX_ISSUES:
        model, source, at = stack.pop()
        fields = type(model).model_fields
        for name in sorted(model.model_fields_set):
            value = getattr(model, name, None)
            info = fields.get(name)
            if value is None or info is None:
                continue
            key = info.alias or name
            raw_value = source.get(key)
            child = f"{at}.{key}"
            if isinstance(value, list):
                if not isinstance(raw_value, list) or len(raw_value) != len(value):
                    continue  # not from this body (cannot happen for validated input)
                for index, (item, raw_item) in enumerate(zip(value, raw_value, strict=True)):
                    _visit(item, raw_item, f"{child}[{index}]", limit, stack, issues)
            else:
                _visit(value, raw_value, child, limit, stack, issues)
    return issues[:MAX_ISSUES]


def _visit(
    value: Any,
    raw: Any,
    path: str,
    limit: int,
    stack: list[tuple[BaseModel, dict[str, Any], str]],
    issues: list[Issue],
) -> None:
    if isinstance(value, BaseModel):
        if isinstance(raw, dict):
            stack.append((value, raw, path))
    elif isinstance(value, bytes):  # base64Binary is the only FHIR type the models hold as bytes
        if not isinstance(raw, str) or _strict_b64decode(raw) != value:
            issues.append(_issue("value", _TEXT_BASE64, path))
        elif len(value) > limit:
            issues.append(_issue("too-long", _TEXT_TOO_LARGE, path))


def _strict_b64decode(text: str) -> bytes | None:
    """The bytes of RFC 4648 base64 `text` (white space between characters allowed, as in
    FHIR's base64Binary), or None when it is not exactly that."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


# --- pydantic errors -> issues ---------------------------------------------------------

_STRUCTURE_TYPES = frozenset(
    {
        "model_type", "model_attributes_type", "dict_type", "list_type", "tuple_type",
        "set_type", "string_type", "int_type", "float_type", "bool_type", "decimal_type",
        "bytes_type", "date_type", "datetime_type", "time_type", "is_instance_of",
        "model_validation_format", "int_from_float", "union_tag_invalid", "arguments_type",
    }
)  # fmt: skip
_VALUE_TYPES_TEXT = {
    "base64_decode": _TEXT_BASE64,
    "greater_than": _TEXT_RANGE,
    "greater_than_equal": _TEXT_RANGE,
    "less_than": _TEXT_RANGE,
    "less_than_equal": _TEXT_RANGE,
    "finite_number": _TEXT_NON_FINITE,
}


def _issues_from_pydantic(exc: ValidationError, resource_type: str) -> list[Issue]:
    issues: list[Issue] = []
    seen: set[tuple[str, str | None]] = set()
    # include_input=False: pydantic must not hand us the offending value at all.
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        kind = error["type"]
        expression = _expression(resource_type, error["loc"], kind == "extra_forbidden")
        code, text = _classify(kind, error.get("msg", ""), expression, resource_type)
        if (text, expression) in seen:
            continue
        seen.add((text, expression))
        issues.append(_issue(code, text, expression))
        if len(issues) >= MAX_ISSUES:
            break
    return issues or [_issue("invalid", _TEXT_INVALID)]


def _classify(kind: str, msg: str, expression: str, resource_type: str) -> tuple[IssueCode, str]:
    # `msg` is used only to tell apart the library's fixed choice-element messages; it is
    # never copied into the issue.
    if kind == "extra_forbidden":
        return "structure", _TEXT_UNKNOWN
    if kind in ("missing", "model_field_validation.missing"):
        return "required", _TEXT_REQUIRED
    if kind == "fhir-validation-wrong-resource-type":
        return "invalid", _TEXT_MISMATCH
    if kind == "list_type" and msg.startswith("None is not allowed"):
        return "structure", _TEXT_NULL
    if kind == "none_required" or kind.endswith("_none"):
        return "structure", _TEXT_NULL
    if kind in _STRUCTURE_TYPES or kind.endswith("_type"):
        return "structure", _TEXT_WRONG_TYPE
    if kind == "value_error":
        # fhir_core's one-of-many check (choice elements) raises ValueError with fixed texts
        if "got multiple" in msg:
            return "invariant", _TEXT_CHOICE_MULTI
        if "Expect any of field value" in msg:
            return "required", _TEXT_CHOICE_MISSING
        if expression == resource_type:
            return "invariant", _TEXT_INVARIANT  # a whole-resource (model) check failed
        return "value", _TEXT_VALUE
    if kind in _VALUE_TYPES_TEXT:
        return "value", _VALUE_TYPES_TEXT[kind]
    return "value", _TEXT_VALUE


def _expression(resource_type: str, loc: tuple[int | str, ...], ends_in_key: bool) -> str:
    """FHIRPath-like path from a pydantic error location. `ends_in_key`: the last item is a
    key from the body (an unknown element), reported by (sanitized) name."""
    parts = [resource_type]
    last = len(loc) - 1
    for position, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not isinstance(item, str):
            continue
        elif ends_in_key and position == last:
            parts.append("." + _safe_name(item))
        elif item == "resource_type":
            parts.append(".resourceType")
        elif item == "root" or not _ELEMENT_NAME.fullmatch(item):
            continue  # fhir_core/pydantic wrapper locations such as "function-wrap[...]"
        else:
            parts.append("." + item[:_MAX_NAME])
    return "".join(parts)


def _safe_name(name: str) -> str:
    """An element name fit for an error path: FHIR-shaped names as they are (cut to
    _MAX_NAME), anything else replaced so that no arbitrary key text is reflected."""
    if _ELEMENT_NAME.fullmatch(name):
        return name[:_MAX_NAME]
    return "<invalid-name>"


def _issue(code: IssueCode, text: str, expression: str | None = None) -> Issue:
    return Issue(severity="error", code=code, diagnostics=text, expression=expression)
