"""Group commit: the entries of concurrent requests go to the database together.

`write(entries)` returns once the entries are committed, and raises `AuditUnavailable` if they
could not be. One flush runs at a time per process; whatever arrives while it runs is the next
batch, so under load one commit serves many requests and when idle an entry is committed at
once (no timer adds latency). A request that goes away while it waits does not take its entries
with it: the flush is a task of its own, so cancelling a waiter cancels only its wait.

Checkpoints are signed in the background once `checkpoint_every` entries have accumulated past
the last one, and by `run_checkpoints` at least every `checkpoint_seconds` while entries arrive.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from carevault.access.alerts import AlertSinks
from carevault.audit.alerts import AlertRules, alert_entry
from carevault.audit.entry import AuditEntry
from carevault.audit.log import AuditLog, ChainBroken
from carevault.edge.metrics import AUDIT_WRITES

log = structlog.get_logger("carevault.audit")


class AuditUnavailable(Exception):
    """The entries could not be made durable: the request must fail (503) and show nothing."""


class AuditWriter:
    def __init__(
        self,
        trail: AuditLog,
        *,
        max_batch: int = 2000,  # one INSERT: 9 parameters a row, within SQLite's 32,766
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        rules: AlertRules | None = None,
        sinks: AlertSinks | None = None,
    ) -> None:
        self.trail = trail
        self._rules = rules
        self._sinks = sinks
        self._max_batch = max_batch
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._pending: list[tuple[list[AuditEntry], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpointed = -1  # size of the last checkpoint this process knows of
        self._size = 0
        self.batches = 0  # commits so far (the benchmark reports entries per commit)

    async def write(self, entries: list[AuditEntry]) -> None:
        if not entries:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch: list[tuple[list[AuditEntry], asyncio.Future[None]]] = []
            count = 0
            while self._pending and (not batch or count < self._max_batch):
                item = self._pending.pop(0)
                batch.append(item)
                count += len(item[0])
            try:
                self._size = await self.trail.append([e for entries, _ in batch for e in entries])
                self.batches += 1
                AUDIT_WRITES.labels(outcome="ok").inc(count)
            except Exception as err:  # noqa: BLE001 - any failure means: not durable, deny
                AUDIT_WRITES.labels(outcome="failed").inc(count)
                log.error("audit_write_failed", error=type(err).__name__)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(AuditUnavailable())
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
            try:
                await self._alert([e for entries, _ in batch for e in entries])
            except Exception as err:  # noqa: BLE001 - alerts must never stall the writer
                log.error("audit_alert_failed", error=type(err).__name__)
            self._maybe_checkpoint()

    async def _alert(self, committed: list[AuditEntry]) -> None:
        if self._rules is None:
            return
        alerts = self._rules.observe(committed)
        if not alerts:
            return
        # Queued, not awaited: the next round of this loop commits them with the next batch.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
        self._pending.append(([alert_entry(a) for a in alerts], done))
        if self._sinks is not None:
            for alert in alerts:
                await self._sinks.emit(alert)

    def _maybe_checkpoint(self) -> None:
        if self._checkpointer is not None and not self._checkpointer.done():
            return
        if self._checkpointed >= 0 and self._size - self._checkpointed < self._checkpoint_every:
            return
        self._checkpointer = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            latest = await self.trail.latest_checkpoint()
            known = latest.size if latest else 0
            if self._size - known >= self._checkpoint_every or self._checkpointed < 0:
                # Every worker's writer sees the same trail size, so all reach this point at
                # about the same time: one finishing the (cheap) work second signs nothing if a
                # checkpoint signed meanwhile leaves less than half an interval behind this
                # process's last commit. Alone, a process skips only for a checkpoint signed by
                # its own timer or on request: one still comes every `checkpoint_every` entries.
                # The first run after a start signs regardless, as before.
                cover = self._size - self._checkpoint_every // 2
                signed = await self.trail.checkpoint(
                    unless_covered=cover if self._checkpointed >= 0 else None
                )
                known = signed.size if signed else known
            self._checkpointed = known
        except ChainBroken as err:
            await self._chain_broken(err)
        except Exception as err:  # noqa: BLE001 - retried at the next batch or tick
            log.error("audit_checkpoint_failed", error=type(err).__name__)

    async def _chain_broken(self, err: ChainBroken) -> None:
        log.error("audit_chain_broken", seq=err.seq)
        if self._sinks is not None:
            await self._sinks.emit({"alert": "audit_chain_broken", "seq": err.seq})

    async def run_checkpoints(self) -> None:
        """Sign a checkpoint every `checkpoint_seconds` when entries arrived since the last."""
        while True:
            await asyncio.sleep(self._checkpoint_seconds)
            try:
                await self.trail.checkpoint()
            except ChainBroken as err:
                await self._chain_broken(err)
            except Exception as err:  # noqa: BLE001 - the next tick tries again
                log.error("audit_checkpoint_failed", error=type(err).__name__)

    async def drain(self) -> None:
        """Wait for queued entries and checkpoints (shutdown, tests). A flush may start a
        checkpoint as it ends, so wait until neither is running."""
        while True:
            running = [
                task
                for task in (self._flusher, self._checkpointer)
                if task is not None and not task.done()
            ]
            if not running:
                return
            for task in running:
                with contextlib.suppress(Exception):
                    await task
