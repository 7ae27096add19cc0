"""Structured logs: one JSON object a line on stderr, with nothing personal or secret in it.

Every log line of the process, carevault's own (structlog) and every library's (standard
`logging`: uvicorn, SQLAlchemy, httpx, authlib, warnings), goes through one handler and one
formatter, so no module can bypass the last two steps before rendering:

1. `exception_summary`: an exception is rendered as its type and its frames (file, line,
   function), never its message, its locals or its arguments: the message of an arbitrary
   exception may quote input, SQL parameters or a body.
2. `scrub`: at any nesting level, a key that names a secret or a personal field (`password`,
   `authorization`, `refresh_token`, `name`, `birthDate`, `telecom`, `identifier`, ...) has its
   value replaced by `[redacted]`; in every string value, JWTs, `Bearer ...` credentials, long
   random tokens, e-mail addresses, `key=value` pairs of secret keys and URL query strings
   are masked.

The scrubber is the backstop, not the policy: callers log event names, ids, classes and
counts, never a value a client sent. Library loggers that would print SQL parameters, URLs or
bodies at DEBUG or INFO are held at WARNING whatever the level (`QUIET_LOGGERS`).

What an access line carries (edge/request_context.py): method, route *template* (never the
path or the query string), status, duration and request id. Not the client's address nor
the principal: both are personal data (GDPR art. 4(1)), and the request id already joins a
line to the audit trail, which records who and from where under its own access rules.

`carevault serve` gives uvicorn `log_config=uvicorn_log_config(settings.log_level)`: uvicorn
applies it in every worker process before the app is imported, so a worker spawned fresh logs
exactly like the parent. `configure(level)` applies the same configuration directly.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.config
import re
import sys
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"

# Keys compared without case, `_` or `-`: "birth_date", "birthDate" and "Birth-Date" alike.
SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxyauthorization",
        "cookie",
        "setcookie",
        "password",
        "newpassword",
        "currentpassword",
        "passwd",
        "token",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "mfatoken",
        "csrftoken",
        "code",
        "codeverifier",
        "clientsecret",
        "clientassertion",
        "assertion",
        "secret",
        "apikey",
        "dpop",
        "otp",
        "totp",
        "recoverycode",
        "body",
        "content",
        "form",
    }
)
# FHIR Patient / HumanName / ContactPoint / Address field names and their usual spellings.
PERSONAL_KEYS = frozenset(
    {
        "name",
        "names",
        "given",
        "family",
        "prefix",
        "suffix",
        "birthdate",
        "dob",
        "dateofbirth",
        "telecom",
        "address",
        "line",
        "postalcode",
        "identifier",
        "ssn",
        "mrn",
        "email",
        "phone",
        "username",
        "query",
        "querystring",
    }
)
_SENSITIVE = SECRET_KEYS | PERSONAL_KEYS
# Rendered as they are: the scrubber never touches them.
_KEPT_KEYS = frozenset({"timestamp", "level", "logger", "request_id"})

_SECRET_PAIR_KEYS = "|".join(
    sorted(
        (
            "password",
            "passwd",
            "token",
            "access_token",
            "refresh_token",
            "id_token",
            "code",
            "code_verifier",
            "client_secret",
            "client_assertion",
            "secret",
        ),
        key=len,
        reverse=True,
    )
)
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWS / JWT in compact form (RFC 7515 §7.1): base64url JSON header "eyJ...".
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), REDACTED),
    # An HTTP credential (RFC 9110 §11.4): scheme and token.
    (re.compile(r"\b(Bearer|DPoP|Basic)\s+[^\s,;\"']+", re.IGNORECASE), r"\1 " + REDACTED),
    # key=value of a secret key, in a form body, a query string or a message.
    (re.compile(rf"\b({_SECRET_PAIR_KEYS})=[^&\s\"']*", re.IGNORECASE), r"\1=" + REDACTED),
    # A URL's query string: search values are often personal (?name=..., ?birthdate=...).
    (re.compile(r"\?[^\s\"'<>]*=[^\s\"'<>]*"), "?" + REDACTED),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+"), REDACTED),
)
# A long random token (secrets.token_urlsafe and the like): 20+ URL-safe characters with an
# upper-case letter, a lower-case letter and a digit. Hex digests and UUIDs are lower-case
# and stay readable; names of classes and events carry no digit.
_OPAQUE = re.compile(r"[A-Za-z0-9_-]{20,}")

# Library loggers that print statements with their parameters, URLs or bodies below WARNING.
QUIET_LOGGERS = {
    "sqlalchemy.engine": "WARNING",
    "sqlalchemy.pool": "WARNING",
    "sqlalchemy.orm": "WARNING",
    "aiosqlite": "WARNING",
    "psycopg": "WARNING",
    "httpx": "WARNING",
    "httpcore": "WARNING",
    "multipart": "WARNING",
    "python_multipart": "WARNING",
    "authlib": "WARNING",
    "asyncio": "WARNING",
    # uvicorn's own access line has the raw path and query; carevault.access replaces it.
    "uvicorn.access": "CRITICAL",
}


@functools.lru_cache(maxsize=4096)
def _normal(key: object) -> str:
    return str(key).lower().replace("_", "").replace("-", "")


# Whether a string could hold anything the patterns mask: one search, and most values (event
# names, templates, ids, classes) answer no.
_SUSPECT = re.compile(r"eyJ|bearer|dpop|basic|[=?@]|[A-Za-z0-9_-]{20}", re.IGNORECASE)


def _opaque(match: re.Match[str]) -> str:
    text = match.group(0)
    if (
        any(c.isupper() for c in text)
        and any(c.islower() for c in text)
        and any(c.isdigit() for c in text)
    ):
        return REDACTED
    return text


def scrub_text(text: str) -> str:
    """`text` with credentials, tokens, e-mail addresses and query strings masked."""
    if not _SUSPECT.search(text):
        return text
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return _OPAQUE.sub(_opaque, text)


def scrub_value(value: Any, depth: int = 0) -> Any:
    """`value` with sensitive keys redacted at any depth and every string scrubbed."""
    if depth > 32:
        return REDACTED
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _normal(k) in _SENSITIVE else scrub_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED  # raw bytes are a body or a key, never worth a log line
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub_text(str(value))


# Values that cannot hold text: rendered as they are (a bool is an int).
_PLAIN = (int, float, type(None))


def scrub(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor, the last before rendering: see the module's docstring."""
    scrubbed = {}
    # Every request writes a line: the common values (strings, numbers) skip `scrub_value`'s
    # walk through every type it knows.
    for key, value in event_dict.items():
        if key in _KEPT_KEYS:
            scrubbed[key] = value
        elif _normal(key) in _SENSITIVE:
            scrubbed[key] = REDACTED
        elif type(value) is str:
            scrubbed[key] = scrub_text(value)
        elif isinstance(value, _PLAIN):
            scrubbed[key] = value
        else:
            scrubbed[key] = scrub_value(value)
    return scrubbed


def render_json(event_dict: EventDict, **_: Any) -> str:
    """One JSON line, by orjson: the standard encoder cost a request's line as much as the
    rest of its processors together. `scrub` leaves only JSON types, but an integer beyond 64
    bits or a float subclass is refused by orjson, and `json` renders those."""
    try:
        return orjson.dumps(event_dict, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(event_dict, default=str)


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info(value: Any) -> ExcInfo | None:
    if value is True:
        value = sys.exc_info()
    elif isinstance(value, BaseException):
        value = (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[0] is not None:
        return value  # type: ignore[return-value]
    return None


def _describe(error: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(error.__traceback__)
    return {
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames[-20:]],
    }


def exception_summary(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace `exc_info` by the exception's type and frames (and those of its causes), with
    no message and no locals; drop `stack_info` (it is the traceback of a log call)."""
    event_dict.pop("stack_info", None)
    info = _exc_info(event_dict.pop("exc_info", None))
    for key in ("exception", "exc_text"):
        if key in event_dict:  # rendered by someone else: a message may be inside
            event_dict[key] = REDACTED
    if info is None:
        return event_dict
    error: BaseException | None = info[1]
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen and len(chain) < 5:
        seen.add(id(error))
        chain.append(_describe(error))
        error = error.__cause__ or error.__context__
    event_dict["exception"] = chain
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's line writer with a name (`structlog.get_logger("carevault.audit")`)."""

    def __init__(self, file: IO[str], name: str) -> None:
        super().__init__(file)  # type: ignore[arg-type]
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._stream, str(args[0]) if args else "")


def _shared_processors() -> list[Processor]:
    """What both structlog's own calls and stdlib records go through first."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _final_processors() -> list[Processor]:
    return [
        exception_summary,
        scrub,  # the last step before rendering
        structlog.processors.JSONRenderer(serializer=render_json),
    ]


def json_formatter(
    level: str = "INFO", stream: IO[str] | None = None, *, cache_loggers: bool = True
) -> structlog.stdlib.ProcessorFormatter:
    """The formatter of standard-library records; also sets structlog up to render its own
    events with the same processors straight into `stream` (no LogRecord on the way: a log
    line costs tens of microseconds, not hundreds).

    A dictConfig factory (`log_config`), so that every uvicorn worker process, where uvicorn
    applies the log configuration before importing the app, sets structlog up too."""
    structlog.configure(
        processors=[*_shared_processors(), *_final_processors()],
        logger_factory=_NamedWriteLoggerFactory(stream if stream is not None else sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=cache_loggers,
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_final_processors(),
        ],
    )


def log_config(
    level: str = "INFO", stream: IO[str] | None = None, *, cache_loggers: bool = True
) -> dict[str, Any]:
    """A `logging.config.dictConfig` configuration: one stderr handler (or `stream`) on the
    root logger with the JSON formatter, every other logger propagating to it; structlog
    writes to the same stream."""
    level = level.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {level!r}")
    target: Any = stream if stream is not None else "ext://sys.stderr"
    loggers: dict[str, Any] = {
        name: {"handlers": [], "propagate": True, "level": quiet}
        for name, quiet in QUIET_LOGGERS.items()
    }
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        loggers[name] = {"handlers": [], "propagate": True, "level": level}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "carevault.logs.json_formatter",
                "level": level,
                "stream": target,
                "cache_loggers": cache_loggers,
            }
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "json", "stream": target}
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": loggers,
    }


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """For `uvicorn.run(..., log_config=uvicorn_log_config(settings.log_level))`.

    Loggers are not cached: a cached structlog logger keeps the stream it first wrote to, so a
    process that configures logging again (a program embedding the server, the test suite's
    log capture after an in-process server) would lose lines. Costs microseconds per line."""
    return log_config(level, cache_loggers=False)


def configure(
    level: str = "INFO", stream: IO[str] | None = None, *, cache_loggers: bool = True
) -> None:
    """Apply `log_config` to this process, and send `warnings` through it as well.

    `cache_loggers=False` for tests: a cached structlog logger would keep this configuration
    after a test put another one in place (structlog.testing.capture_logs)."""
    logging.config.dictConfig(log_config(level, stream, cache_loggers=cache_loggers))
    logging.captureWarnings(True)
