"""Verifying a long trail on several processes, with the same verdict as one pass.

Verification is CPU-bound (a JSON parse, a MAC and a Merkle leaf per entry), so a long trail is
cut into block-aligned ranges, each verified by a forked process on its own connection from
the state stored just before it: the chain MAC of the entry before and the Merkle peaks built
from stored block hashes (`archive.start_at`). That starting state is not trusted: the range
before it must end, after its own verification, with exactly that MAC and those peaks (the
stitch), having read every entry up to the boundary. So a parallel run is ok exactly when a
single pass would be.

When any range finds a problem, or a stitch does not hold, the verdict is left to one pass
starting at the first range that did not verify and stitch: every range before it did, so its
starting state is the one a pass from the beginning would reach, and the problem reported (its
sequence number and kind) is the one a pass from the beginning would report.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from carevault.audit import merkle
from carevault.audit.log import Checkpoint
from carevault.audit.verify import Report, Start, Verifier
from carevault.crypto.custody import AuditKeys

# Below this many entries per process, forking costs more than it saves.
MIN_RANGE = 131_072
_PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class Range:
    first: int
    last: int
    final: bool  # the trail's tail: a checkpoint beyond `last` means truncation


@dataclass
class RangeResult:
    range: Range
    report: Report | None  # None: the range could not be read (a missing start, an error)
    end: Start | None  # the verifier's state after the range, to stitch with the next start
    start: Start | None  # the state the range started from (from the database)


def split(
    first: int, last: int, processes: int, min_range: int = MIN_RANGE, *, whole: bool = True
) -> list[Range]:
    """Block-aligned ranges covering first..last, at most `processes`, none shorter than
    `min_range` entries (one range when the trail is short). `whole`: `last` is the trail's
    newest entry."""
    count = min(processes, (last - first + 1) // max(min_range, 1))
    if count < 2:
        return [Range(first, last, whole)]
    width = (last - first + 1) // count
    bounds = [first]
    for i in range(1, count):
        cut = (first - 1 + i * width) // merkle.BLOCK * merkle.BLOCK + 1  # starts a block
        if cut > bounds[-1]:
            bounds.append(cut)
    ends = [b - 1 for b in bounds[1:]] + [last]
    return [Range(lo, hi, whole and hi == last) for lo, hi in zip(bounds, ends, strict=True)]


def verify_ranges(
    database_url: str,
    keys: AuditKeys | None,
    ranges: list[Range],
    checkpoints: list[Checkpoint],
    block_hashes: dict[int, bytes],
    progress: Callable[[int], None] | None,
) -> tuple[Report, int | None]:
    """Verify the ranges in forked processes. Returns the report of the ranges that verified
    and stitched, and where a single pass must take over (None: nowhere, all did)."""
    context = multiprocessing.get_context("fork")  # the children share the loaded audit keys
    counts: Any = context.SimpleQueue()
    pipes = []
    workers = []
    for index, part in enumerate(ranges):
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(
            target=_worker,
            args=(
                send,
                counts,
                database_url,
                keys,
                part,
                _of_range(checkpoints, ranges, index),
                block_hashes,
            ),
            daemon=True,
        )
        worker.start()
        send.close()
        pipes.append(receive)
        workers.append(worker)
    results: list[RangeResult | None] = [None] * len(ranges)
    try:
        pending = dict(enumerate(pipes))
        while pending:
            while not counts.empty():
                done = counts.get()
                if progress is not None:
                    progress(done)
            for index in [i for i, pipe in pending.items() if pipe.poll(0.05)]:
                with contextlib.suppress(EOFError):
                    results[index] = pending[index].recv()
                del pending[index]
        while not counts.empty():
            done = counts.get()
            if progress is not None:
                progress(done)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    return _merge(ranges, results)


def _of_range(checkpoints: list[Checkpoint], ranges: list[Range], index: int) -> list[Checkpoint]:
    """The checkpoints a range checks: those it ends inside of, or the first range's starting
    one; the last range also gets every larger one (truncation)."""
    part = ranges[index]
    low = part.first - 1 if index == 0 else part.first
    return [c for c in checkpoints if c.size >= low and (part.final or c.size <= part.last)]


def _merge(ranges: list[Range], results: list[RangeResult | None]) -> tuple[Report, int | None]:
    """The report of the ranges that verified and stitched, in order, and the first entry of
    the first range that did not (None when all did)."""
    merged = Report(first=ranges[0].first)
    for index, result in enumerate(results):
        part = ranges[index]
        report = result.report if result is not None else None
        following = results[index + 1] if index + 1 < len(results) else None
        if index + 1 == len(results):
            complete = stitched = True
        else:  # every entry up to the boundary was read, and the next range began there
            complete = report is not None and report.last == part.last
            stitched = (
                result is not None and following is not None and result.end == following.start
            )
        if report is None or not (report.ok and complete and stitched):
            return merged, part.first
        merged.macs_checked = report.macs_checked
        merged.last = report.last
        merged.entries += report.entries
        merged.checkpoints += report.checkpoints
        merged.notes.extend(report.notes)
    return merged, None


def _worker(
    send: Any,
    counts: Any,
    database_url: str,
    keys: AuditKeys | None,
    part: Range,
    checkpoints: list[Checkpoint],
    block_hashes: dict[int, bytes],
) -> None:
    from carevault.audit import archive

    result = RangeResult(part, None, None, None)
    try:
        with archive.connect(database_url) as conn:
            start = archive.start_at(conn, part.first, block_hashes)
            result.start = start
            verifier = Verifier(
                keys.mac if keys else None,
                {keys.key_id: keys.public_key} if keys else {},
                checkpoints,
                start,
                block_hashes,
            )
            done = 0
            for _ in verifier.feed(archive.rows(conn, part.first, part.last)):
                done += 1
                if done == _PROGRESS_EVERY:
                    counts.put(done)
                    done = 0
            if done:
                counts.put(done)
            result.report = verifier.finish(whole=part.final)
            result.end = verifier.state()
    except Exception:  # noqa: BLE001, S110 - reported as a range that did not verify
        pass
    send.send(result)
    send.close()


def default_processes() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
