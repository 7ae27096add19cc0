"""The OpenAPI document: every status an operation can answer, and its security scheme.

(Stub: filled in by issue 8.)
"""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    return None
