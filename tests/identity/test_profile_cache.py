"""`ProfileCache`: concurrent misses share one read; expiry, errors and cancellation behave."""

from __future__ import annotations

import asyncio

import pytest

from carevault.identity.accounts import ProfileCache, User


def _user(user_id: str) -> User:
    return User(
        id=user_id,
        username="alice",
        password_hash="x",
        roles=("physician",),
        organization_id=None,
        practitioner_id=None,
        patient_id=None,
        enabled=True,
        is_demo=False,
    )


class SlowStore:
    """Stands in for `UserStore.by_id`: counts reads, each waits for `release`."""

    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()
        self.fail = False

    async def by_id(self, user_id: str) -> User | None:
        self.reads += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("database down")
        return _user(user_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(store: SlowStore, clock: Clock) -> ProfileCache:
    cache = ProfileCache(store, ttl_seconds=5.0)  # type: ignore[arg-type]
    cache._now = clock
    return cache


async def test_concurrent_misses_share_one_read_and_expiry_reads_again() -> None:
    store, clock = SlowStore(), Clock()
    cache = _cache(store, clock)
    waiters = [asyncio.create_task(cache.get("u1")) for _ in range(32)]
    await asyncio.sleep(0)
    store.release.set()
    users = await asyncio.gather(*waiters)
    assert store.reads == 1
    assert all(u is not None and u.id == "u1" for u in users)

    clock.now += 4.9
    assert (await cache.get("u1")) is not None
    assert store.reads == 1
    clock.now += 0.2
    assert (await cache.get("u1")) is not None
    assert store.reads == 2


async def test_different_users_are_read_separately() -> None:
    store, clock = SlowStore(), Clock()
    cache = _cache(store, clock)
    store.release.set()
    a, b = await asyncio.gather(cache.get("a"), cache.get("b"))
    assert (a.id, b.id) == ("a", "b")  # type: ignore[union-attr]
    assert store.reads == 2


async def test_a_failed_read_reaches_every_caller_and_is_not_cached() -> None:
    store, clock = SlowStore(), Clock()
    cache = _cache(store, clock)
    store.fail = True
    waiters = [asyncio.create_task(cache.get("u1")) for _ in range(3)]
    await asyncio.sleep(0)
    store.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert store.reads == 1
    store.fail = False
    assert (await cache.get("u1")) is not None
    assert store.reads == 2


async def test_one_caller_cancelled_does_not_cancel_the_shared_read() -> None:
    store, clock = SlowStore(), Clock()
    cache = _cache(store, clock)
    first = asyncio.create_task(cache.get("u1"))
    second = asyncio.create_task(cache.get("u1"))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    store.release.set()
    assert (await second) is not None
    assert store.reads == 1
