"""The server-side browser session store (placeholder; issue 6)."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.config import Settings


class BrowserSessions:
    def __init__(
        self, settings: Settings, engine: AsyncEngine, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._clock = clock
