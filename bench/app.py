"""The app factory the HTTP benchmark serves: the product app plus one baseline route.

`GET /bench/static` answers, without authentication, exactly the bytes `GET /auth/me` answered
for the benchmark user (same body, same content type, same Cache-Control), so that the two
scenarios differ only by what `/auth/me` does: bearer authentication (signature, claims,
revocation), the profile lookup and the response serialisation. The route exists only in this
factory; `carevault.app.create_app` never has it.

The harness writes the body to the file named by `CAREVAULT_BENCH_STATIC_BODY` after it has
logged in and fetched `/auth/me`; the route reads it on first use and serves it from memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Response

from carevault.app import create_app

STATIC_BODY_ENV = "CAREVAULT_BENCH_STATIC_BODY"
STATIC_PATH = "/bench/static"


def create_bench_app() -> FastAPI:
    app = create_app()
    body_file = os.environ.get(STATIC_BODY_ENV)
    cached: list[bytes] = []

    @app.get(STATIC_PATH, include_in_schema=False)
    async def bench_static() -> Response:
        if not cached:
            if not body_file:
                return Response(status_code=503)
            try:
                # Once per worker, a few hundred bytes: not worth a thread hop.
                cached.append(Path(body_file).read_bytes())  # noqa: ASYNC240
            except OSError:
                return Response(status_code=503)  # not written yet: the harness retries
        return Response(
            cached[0], media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    return app
