"""No user enumeration through timing: unknown users cost one (dummy) Argon2 verify too.

This is a property test, not a speed benchmark: it compares two paths measured in the same
run and allows a wide band (0.5x-2x). Without the dummy verify it measured 0.31 here.
"""

from __future__ import annotations

import statistics
import time

from carevault.identity.roles import Role

ROUNDS = 12


async def test_unknown_user_and_wrong_password_take_similar_time(clocked, clock):
    for i in range(ROUNDS):
        await clocked.add_user(f"timing.user{i}", Role.nurse)

    async def timed(username: str) -> float:
        clock.advance(120)  # keep backoff out of the measurement
        start = time.perf_counter()
        response = await clocked.client.post(
            "/auth/login", json={"username": username, "password": "definitely-wrong-pw"}
        )
        elapsed = time.perf_counter() - start
        assert response.status_code == 401
        return elapsed

    await timed("warm.up")
    unknown, wrong = [], []
    for i in range(ROUNDS):  # interleaved, so drift on a noisy machine hits both alike
        unknown.append(await timed(f"no.such.user{i}"))
        wrong.append(await timed(f"timing.user{i}"))
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 <= ratio <= 2.0, ratio
