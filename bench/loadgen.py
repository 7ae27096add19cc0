"""A small HTTP/1.1 keep-alive load generator, the fallback when `wrk` cannot be had.

`python -m bench.loadgen --url URL --connections N --duration S` opens N connections, each
sending one request after the other (closed loop, like wrk), and prints one JSON line:
requests, duration, errors and latency percentiles in microseconds. The `Authorization` header,
if any, comes from the environment variable BENCH_AUTHORIZATION; like `bench.suite`'s wrk
script, BENCH_PATHS_FILE (paths to rotate over, one a line), BENCH_BODIES_FILE (request bodies
to rotate over), BENCH_METHOD and BENCH_CONTENT_TYPE shape the requests. It runs in its own
process, but on a 2-core machine its own CPU use competes with the server's: prefer wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    stop_at: float,
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    perf = time.perf_counter
    counter = random.randrange(len(requests))
    while perf() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors["connect"] += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while perf() < stop_at:
                counter = (counter + 1) % len(requests)
                started = perf()
                writer.write(requests[counter])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                        break
                if length:
                    await reader.readexactly(length)
                latencies.append((perf() - started) * 1e6)
                if not 200 <= status < 400:
                    errors["status"] += 1
                if b"connection: close" in head.lower():
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            errors["read"] += 1
        finally:
            writer.close()


def _lines(variable: str) -> list[str] | None:
    name = os.environ.get(variable)
    if not name:
        return None
    return [line for line in Path(name).read_text().splitlines() if line]


def build_requests(url: str, authorization: str) -> list[bytes]:
    """The raw HTTP/1.1 requests to rotate over (one, unless paths or bodies are given)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    paths = _lines("BENCH_PATHS_FILE") or [
        (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ]
    bodies = _lines("BENCH_BODIES_FILE")
    method = os.environ.get("BENCH_METHOD") or ("POST" if bodies else "GET")
    content_type = os.environ.get("BENCH_CONTENT_TYPE")
    out = []
    for i in range(max(len(paths), len(bodies or []))):
        body = bodies[i % len(bodies)].encode() if bodies else b""
        headers = [f"{method} {paths[i % len(paths)]} HTTP/1.1", f"Host: {host}:{port}"]
        headers.append("Accept: */*")
        if authorization:
            headers.append(f"Authorization: {authorization}")
        if content_type:
            headers.append(f"Content-Type: {content_type}")
        if body or method != "GET":
            headers.append(f"Content-Length: {len(body)}")
        out.append(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body)
    return out


async def run(url: str, connections: int, duration: float, authorization: str) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = build_requests(url, authorization)
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(
        *(_connection(host, port, requests, stop_at, latencies, errors) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    mean = sum(latencies) / len(latencies) if latencies else 0.0
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "errors": errors,
        "latency_us": {
            "min": latencies[0] if latencies else 0.0,
            "max": latencies[-1] if latencies else 0.0,
            "mean": mean,
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "p999": percentile(latencies, 99.9),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    work = run(args.url, args.connections, args.duration, os.environ.get("BENCH_AUTHORIZATION", ""))
    try:
        import uvloop

        result = uvloop.run(work)
    except ImportError:
        result = asyncio.run(work)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
