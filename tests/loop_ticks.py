"""How many times the event loop got to run while something was awaited: the proof that a
wait (for a lock, a thread) did not hold the loop up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def ticking(work: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """`await work()`, and how many 10 ms ticks the loop made meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work(), ticks
    finally:
        ticker.cancel()
