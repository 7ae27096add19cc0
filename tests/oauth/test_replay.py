"""The one-time-value replay cache, on SQLite, PostgreSQL and Redis.

What matters is that the cache is shared: two uvicorn workers (two processes, two engines or two
Redis clients) must see each other's keys, and a key raced from many places at once is accepted
exactly once. When the store cannot answer, the cache raises `ReplayCacheUnavailable`: never a
silent True.

One migrated store per backend and module (`replay_store`); every test uses random keys, so the
tests do not see each other's rows. tests/oauth/test_dpop.py reuses these fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from carevault.config import Settings
from carevault.db.engine import create_engine, dispose
from carevault.db.tables import oauth_replay
from carevault.oauth.replay import (
    DatabaseReplayCache,
    RedisReplayCache,
    ReplayCache,
    ReplayCacheUnavailable,
    build_replay_cache,
    stored_key,
)
from tests.conftest import PG_SKIP, PG_URL, REDIS_SKIP, REDIS_URL, FakeClock, make_settings

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
UNREACHABLE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2"


@dataclass
class Store:
    kind: str  # sqlite | postgresql | redis
    settings: Settings  # a migrated database (also there for redis: build_replay_cache)
    redis_url: str | None = None

    @property
    def is_redis(self) -> bool:
        return self.kind == "redis"


def _pg_database_url(name: str) -> str:
    assert PG_URL
    return f"{PG_URL}?application_name={name}&options=-csearch_path%3D{name}"


@pytest.fixture(
    scope="module",
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
def replay_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """A migrated store per backend, kept for the module (migrations cost most of a second)."""
    kind = request.param
    if kind == "postgresql" and not PG_URL:
        pytest.skip(PG_SKIP)
    if kind == "redis" and not REDIS_URL:
        pytest.skip(REDIS_SKIP)
    data_dir = tmp_path_factory.mktemp(f"replay-{kind}")
    if kind != "postgresql":
        yield Store(kind, make_settings(data_dir), REDIS_URL if kind == "redis" else None)
        return
    import psycopg

    assert PG_URL
    schema = f"cv_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')  # our name, not input
    try:
        yield Store(kind, make_settings(data_dir, _pg_database_url(schema)))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (schema,),
            )
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


DATABASE_ONLY = pytest.mark.parametrize(
    "replay_store",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
    indirect=True,
)
REDIS_ONLY = pytest.mark.parametrize(
    "replay_store", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True
)


@pytest.fixture
async def make_cache(replay_store: Store) -> Any:
    """Build independent caches on the module's store: each database cache has its own engine
    (its own pool, as in another worker process), each Redis cache its own client."""
    caches: list[ReplayCache] = []
    engines: list[AsyncEngine] = []

    def make(clock: Callable[[], float] = time.time, **options: Any) -> ReplayCache:
        cache: ReplayCache
        if replay_store.is_redis:
            assert replay_store.redis_url
            cache = RedisReplayCache(replay_store.redis_url, clock)
        else:
            engine = create_engine(replay_store.settings)
            engines.append(engine)
            cache = DatabaseReplayCache(engine, clock, **options)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()
    for engine in engines:
        await dispose(engine)


def new_key() -> str:
    return f"test:{uuid.uuid4().hex}"


async def _rows(settings: Settings, keys: list[str]) -> dict[str, float]:
    """The stored rows of these keys (database stores only): stored key -> expires_at."""
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(oauth_replay.c.key, oauth_replay.c.expires_at).where(
                    oauth_replay.c.key.in_([stored_key(k) for k in keys])
                )
            )
            return {row.key: row.expires_at for row in result}
    finally:
        await dispose(engine)


# --- the contract ---------------------------------------------------------------------------------


async def test_first_use_once_then_replay(make_cache: Any) -> None:
    cache = make_cache()
    key = new_key()
    expires = time.time() + 60
    assert await cache.first_use(key, expires) is True
    assert await cache.first_use(key, expires) is False
    assert await cache.first_use(key, expires + 600) is False  # a later expiry changes nothing


async def test_distinct_keys_are_independent(make_cache: Any) -> None:
    cache = make_cache()
    expires = time.time() + 60
    base = new_key()
    assert await cache.first_use(base, expires) is True
    for other in (base + "x", base.upper(), base[:-1], " " + base):
        assert await cache.first_use(other, expires) is True


async def test_two_instances_share_keys(make_cache: Any) -> None:
    """Two workers (separate engines / Redis clients) see each other's keys, both ways."""
    worker_a, worker_b = make_cache(), make_cache()
    expires = time.time() + 60
    first, second = new_key(), new_key()
    assert await worker_a.first_use(first, expires) is True
    assert await worker_b.first_use(first, expires) is False
    assert await worker_b.first_use(second, expires) is True
    assert await worker_a.first_use(second, expires) is False


async def test_concurrent_first_use_exactly_one_wins(make_cache: Any) -> None:
    """One key raced by 40 tasks over four instances: exactly one True."""
    caches = [make_cache() for _ in range(4)]
    expires = time.time() + 60
    for _ in range(3):
        key = new_key()
        results = await asyncio.gather(
            *(caches[i % len(caches)].first_use(key, expires) for i in range(40))
        )
        assert results.count(True) == 1, results


async def test_concurrent_distinct_keys_all_first(make_cache: Any) -> None:
    caches = [make_cache(), make_cache()]
    expires = time.time() + 60
    keys = [new_key() for _ in range(30)]
    results = await asyncio.gather(
        *(caches[i % 2].first_use(key, expires) for i, key in enumerate(keys))
    )
    assert results == [True] * len(keys)


async def test_long_and_odd_keys(make_cache: Any, replay_store: Store) -> None:
    """Keys of any length and content; two long keys that differ only at the end are two keys.
    The database stores a 64-character digest, never the key itself."""
    cache = make_cache()
    expires = time.time() + 60
    prefix = "dpop:" + "k" * 1000 + uuid.uuid4().hex
    keys = [prefix + "a", prefix + "b", new_key() + "é\x00;' DROP TABLE oauth_replay; --"]
    for key in keys:
        assert await cache.first_use(key, expires) is True
    for key in keys:
        assert await cache.first_use(key, expires) is False
    if not replay_store.is_redis:
        rows = await _rows(replay_store.settings, keys)
        assert len(rows) == 3
        assert all(len(stored) == 64 and stored not in keys for stored in rows)


# --- expiry ---------------------------------------------------------------------------------------


async def test_key_usable_again_after_expiry(make_cache: Any, replay_store: Store) -> None:
    key = new_key()
    if replay_store.is_redis:
        # Redis expires the key itself; the TTL is computed with the cache's clock.
        cache = make_cache()
        assert await cache.first_use(key, time.time() + 0.3) is True
        assert await cache.first_use(key, time.time() + 0.3) is False
        await asyncio.sleep(0.45)
        assert await cache.first_use(key, time.time() + 60) is True
        assert await cache.first_use(key, time.time() + 60) is False
        return
    clock = FakeClock()
    worker_a, worker_b = make_cache(clock), make_cache(clock)
    assert await worker_a.first_use(key, clock.now + 10) is True
    clock.advance(9.9)
    assert await worker_b.first_use(key, clock.now + 10) is False  # still remembered
    clock.advance(0.1)  # now == expires_at: forgotten
    assert await worker_b.first_use(key, clock.now + 10) is True
    assert await worker_a.first_use(key, clock.now + 10) is False
    rows = await _rows(replay_store.settings, [key])
    assert list(rows.values()) == [pytest.approx(clock.now + 10)]


@DATABASE_ONLY
async def test_expired_key_raced_exactly_one_wins(make_cache: Any, replay_store: Store) -> None:
    clock = FakeClock()
    caches = [make_cache(clock) for _ in range(4)]
    key = new_key()
    assert await caches[0].first_use(key, clock.now + 5) is True
    clock.advance(60)
    results = await asyncio.gather(
        *(caches[i % 4].first_use(key, clock.now + 5) for i in range(40))
    )
    assert results.count(True) == 1, results


@REDIS_ONLY
async def test_redis_keys_carry_a_ttl(replay_store: Store, make_cache: Any) -> None:
    """Every Redis key expires by itself (no unbounded growth), under the documented prefix."""
    clock = FakeClock(time.time() - 3600)  # the app's clock, far behind Redis's: TTL is relative
    cache = make_cache(clock)
    key = new_key()
    assert await cache.first_use(key, clock.now + 30) is True
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        ttl = await client.pttl(RedisReplayCache.PREFIX + stored_key(key))
    finally:
        await client.aclose()
    assert 25_000 < ttl <= 30_000
    assert await cache.first_use(key, clock.now + 30) is False


@DATABASE_ONLY
async def test_purge_removes_expired_rows(make_cache: Any, replay_store: Store) -> None:
    clock = FakeClock()
    cache = make_cache(clock, purge_every=3, purge_batch=1000)
    old = [new_key() for _ in range(3)]  # the third insert purges (nothing expired yet)
    for key in old:
        assert await cache.first_use(key, clock.now + 10) is True
    assert len(await _rows(replay_store.settings, old)) == 3
    clock.advance(11)
    live = [new_key() for _ in range(3)]  # the sixth insert purges the three expired rows
    for key in live:
        assert await cache.first_use(key, clock.now + 10) is True
    assert await _rows(replay_store.settings, old) == {}
    assert len(await _rows(replay_store.settings, live)) == 3
    for key in live:
        assert await cache.first_use(key, clock.now + 10) is False


@DATABASE_ONLY
async def test_purge_is_bounded(make_cache: Any, replay_store: Store) -> None:
    clock = FakeClock()
    cache = make_cache(clock, purge_every=10_000, purge_batch=2)
    keys = [new_key() for _ in range(5)]
    for key in keys:
        await cache.first_use(key, clock.now + 1)
    clock.advance(10)
    removed = await cache.purge_expired()
    assert removed == 2
    # Rows of other tests may expire in this clock's future too: count only ours.
    assert len(await _rows(replay_store.settings, keys)) >= 3
    while await cache.purge_expired():
        pass
    assert await _rows(replay_store.settings, keys) == {}


# --- across processes -----------------------------------------------------------------------------

_WORKER = r"""
import asyncio, json, os, sys, time
from pathlib import Path

from carevault.config import Settings
from carevault.db.engine import create_engine, dispose
from carevault.oauth.replay import DatabaseReplayCache, RedisReplayCache

spec = json.loads(sys.argv[1])

async def main():
    if spec["redis_url"]:
        cache = RedisReplayCache(spec["redis_url"])
        engine = None
    else:
        settings = Settings(data_dir=Path(spec["data_dir"]), database_url=spec["database_url"])
        engine = create_engine(settings)
        cache = DatabaseReplayCache(engine)
    Path(spec["ready"]).touch()
    while not os.path.exists(spec["go"]):
        await asyncio.sleep(0.005)
    expires = time.time() + 60
    results = await asyncio.gather(*(cache.first_use(k, expires) for k in spec["keys"]))
    await cache.close()
    if engine is not None:
        await dispose(engine)
    print(json.dumps(results))

asyncio.run(main())
"""


async def test_separate_processes_share_keys(replay_store: Store, tmp_path: Path) -> None:
    """Two real worker processes race on the same 30 keys: each key is accepted once."""
    keys = [new_key() for _ in range(30)]
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{n}" for n in range(2)]
    orders = [keys, keys[::-1]]  # each process starts at the other end
    procs = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for ready, order in zip(readies, orders, strict=True):
        spec = {
            "redis_url": replay_store.redis_url,
            "data_dir": str(replay_store.settings.data_dir),
            "database_url": replay_store.settings.database_url,
            "keys": order,
            "ready": str(ready),
            "go": str(go),
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _WORKER,
                json.dumps(spec),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        )
    try:
        async with asyncio.timeout(90):
            while not all(r.exists() for r in readies):  # noqa: ASYNC110 - a file barrier
                assert all(p.returncode is None for p in procs), "a worker died at start"
                await asyncio.sleep(0.01)
            go.touch()
            outputs = [await p.communicate() for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    wins = dict.fromkeys(keys, 0)
    for proc, order, (out, err) in zip(procs, orders, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        for key, first in zip(order, json.loads(out), strict=True):
            wins[key] += first
    assert wins == dict.fromkeys(keys, 1)


# --- failing closed -------------------------------------------------------------------------------


async def test_redis_unreachable_is_unavailable() -> None:
    cache = RedisReplayCache(UNREACHABLE_REDIS)
    try:
        with pytest.raises(ReplayCacheUnavailable):
            await cache.first_use(new_key(), time.time() + 60)
    finally:
        await cache.close()


@pytest.mark.redis
@pytest.mark.skipif(REDIS_URL is None, reason=REDIS_SKIP)
async def test_redis_answering_with_errors_is_unavailable() -> None:
    """A Redis that answers but refuses (here: a database index that does not exist)."""
    assert REDIS_URL
    cache = RedisReplayCache(REDIS_URL.rsplit("/", 1)[0] + "/100000")
    try:
        with pytest.raises(ReplayCacheUnavailable):
            await cache.first_use(new_key(), time.time() + 60)
    finally:
        await cache.close()


async def test_database_unreachable_is_unavailable() -> None:
    engine = create_async_engine(UNREACHABLE_POSTGRES)
    try:
        with pytest.raises(ReplayCacheUnavailable):
            await DatabaseReplayCache(engine).first_use(new_key(), time.time() + 60)
    finally:
        await dispose(engine)


async def test_sqlite_file_unopenable_is_unavailable(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'cv.db'}")
    before = set(threading.enumerate())
    try:
        with pytest.raises(ReplayCacheUnavailable):
            await DatabaseReplayCache(engine).first_use(new_key(), time.time() + 60)
    finally:
        await dispose(engine)
        await _connection_threads_ended(before)


async def _connection_threads_ended(before: set[threading.Thread]) -> None:
    """aiosqlite stops the thread of a connection that failed to open by queueing a stop whose
    answer goes to the event loop. Once the test's loop is closed, that answer raises in the
    thread ('Event loop is closed'), reported against whichever test runs next: let the thread
    finish while the loop still runs."""

    def running() -> bool:
        return any(
            t.is_alive() and "_connection_worker_thread" in t.name
            for t in set(threading.enumerate()) - before
        )

    async with asyncio.timeout(5):
        while running():  # noqa: ASYNC110 - another thread's state: no event to wait on
            await asyncio.sleep(0.001)


async def test_missing_table_is_unavailable_not_first_use(tmp_path: Path) -> None:
    """A database error other than the unique violation is never read as an answer."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    try:
        cache = DatabaseReplayCache(engine)
        for _ in range(2):
            with pytest.raises(ReplayCacheUnavailable):
                await cache.first_use("same", time.time() + 60)
    finally:
        await dispose(engine)


async def test_sqlite_store_gone_mid_life_is_unavailable(tmp_path: Path) -> None:
    """A cache that worked, then lost its table: the next use is refused, not accepted."""
    engine = create_engine(make_settings(tmp_path / "var"))
    cache = DatabaseReplayCache(engine)
    try:
        assert await cache.first_use(new_key(), time.time() + 60) is True
        async with engine.begin() as conn:
            await conn.run_sync(oauth_replay.drop)
        with pytest.raises(ReplayCacheUnavailable):
            await cache.first_use(new_key(), time.time() + 60)
    finally:
        await dispose(engine)


# --- wiring ---------------------------------------------------------------------------------------


@DATABASE_ONLY
async def test_build_replay_cache_picks_the_backend(replay_store: Store) -> None:
    settings = replay_store.settings
    engine = create_engine(settings)
    try:
        database_cache = build_replay_cache(settings.model_copy(update={"redis_url": None}), engine)
        assert isinstance(database_cache, DatabaseReplayCache)
        redis_cache = build_replay_cache(
            settings.model_copy(update={"redis_url": UNREACHABLE_REDIS}), engine
        )
        assert isinstance(redis_cache, RedisReplayCache)
        with pytest.raises(ReplayCacheUnavailable):  # no silent fallback to the database
            await redis_cache.first_use(new_key(), time.time() + 60)
        await redis_cache.close()
        assert await database_cache.first_use(new_key(), time.time() + 60) is True
    finally:
        await dispose(engine)


@DATABASE_ONLY
async def test_rows_count_matches_uses(make_cache: Any, replay_store: Store) -> None:
    """One row per accepted key; a refused use writes nothing."""
    cache = make_cache()
    keys = [new_key() for _ in range(5)]
    for key in keys:
        await cache.first_use(key, time.time() + 60)
        await cache.first_use(key, time.time() + 60)
    engine = create_engine(replay_store.settings)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(
                select(func.count())
                .select_from(oauth_replay)
                .where(oauth_replay.c.key.in_([stored_key(k) for k in keys]))
            )
    finally:
        await dispose(engine)
    assert count == 5
