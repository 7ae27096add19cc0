"""RFC 9457 problem details for every error, with generic wording.

No handler here ever puts an exception message, a stack trace, SQL or a request value in the
body: validation errors report where (the JSON path) and what kind, never the input.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("carevault.edge")


class ProblemError(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.title = title
        self.type = type_
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(detail or "")


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    return JSONResponse(
        body,
        status_code=status,
        media_type=PROBLEM_JSON,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


_GENERIC_DETAIL = {
    400: "The request could not be understood.",
    401: "Authentication is required.",
    403: "You are not allowed to do this.",
    404: "Not found.",
    405: "Method not allowed.",
    406: "Not acceptable.",
    409: "Conflict.",
    413: "The request body is too large.",
    415: "Unsupported content type.",
    422: "The request is not valid.",
    429: "Too many requests.",
    500: "Internal error.",
    503: "Service temporarily unavailable.",
}


def _validation_errors(exc: RequestValidationError) -> tuple[int, list[dict[str, Any]]]:
    status = 422
    errors: list[dict[str, Any]] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            status = 400
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        errors.append({"pointer": "/" + "/".join(loc), "type": err.get("type", "invalid")})
    return status, errors[:20]


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.detail or _GENERIC_DETAIL.get(exc.status),
            title=exc.title,
            type_=exc.type,
            headers=exc.headers,
            extra=exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, errors = _validation_errors(exc)
        return problem_response(status, _GENERIC_DETAIL[status], extra={"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        return problem_response(
            status, _GENERIC_DETAIL.get(status), headers=dict(exc.headers or {})
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        return problem_response(400, "The request body is nested too deeply.")

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value (e.g. a NUL byte in PostgreSQL text): bad input, not a
        # server fault. The driver's message may quote the value, so it is not passed on.
        return problem_response(400, _GENERIC_DETAIL[400])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged by type only: the message of an arbitrary exception may carry input or SQL.
        log.error(
            "unhandled_error", error_type=type(exc).__name__, path=request.scope.get("route_path")
        )
        return problem_response(500, _GENERIC_DETAIL[500])
