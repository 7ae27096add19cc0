"""`captured_logs`: the process's real log configuration (carevault.logs.configure) at DEBUG,
writing into a buffer instead of stderr; what was there before is put back after the test."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from carevault import logs


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line, parsed: a line that is not one JSON object fails the test."""
        parsed = []
        for line in self.text.splitlines():
            value = json.loads(line)
            assert isinstance(value, dict), line
            parsed.append(value)
        return parsed

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("logger") == "carevault.access"]


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    named = ("uvicorn", "uvicorn.error", "uvicorn.asgi", "carevault", *logs.QUIET_LOGGERS)
    capture = LogCapture()
    logs.configure("DEBUG", capture.stream, cache_loggers=False)
    try:
        yield capture
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name in named:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.captureWarnings(False)
        structlog.reset_defaults()
