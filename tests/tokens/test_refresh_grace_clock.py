"""The grace window compares against the clock of the process that answers, which may read
earlier than the `used_at` written by the process that won the rotation: on PostgreSQL a loser
of the race read its clock before the winner did (1 batch in ~16 of 8 concurrent refreshes was
taken for theft), and across hosts clocks differ by milliseconds. Neither is a reuse."""

from __future__ import annotations

import pytest

from carevault.identity.roles import Role
from carevault.runtime import build_services
from carevault.tokens.refresh import RefreshError
from tests.conftest import STRONG_PASSWORD, FakeClock

CLIENT = "carevault-login"


@pytest.fixture
async def two_hosts(settings_factory):
    """Two service sets on one database; the second one's clock runs 50 ms behind."""
    settings = settings_factory()
    ahead = FakeClock()
    behind = FakeClock(ahead.now - 0.05)
    built = [build_services(settings, ahead), build_services(settings, behind)]
    for services in built:
        await services.start()
    try:
        yield (*built, ahead, behind)
    finally:
        for services in built:
            await services.close()


async def _family(services):
    user = await services.accounts.add_user("clock.user", STRONG_PASSWORD, Role.physician)
    return await services.refresh.start_family(
        user_id=user.id, client_id=CLIENT, scope="openid", amr=["pwd"], auth_time=0
    )


async def test_retry_read_before_the_winners_clock_is_in_grace(two_hosts):
    first, second, _, _ = two_hosts
    _, token = await _family(first)
    won = await first.refresh.rotate(token, CLIENT)
    retried = await second.refresh.rotate(token, CLIENT)  # its clock reads before used_at
    assert retried.replayed_in_grace
    assert retried.refresh_token == won.refresh_token
    assert (await second.refresh.rotate(won.refresh_token, CLIENT)).refresh_token


async def test_skew_does_not_widen_the_window(two_hosts):
    first, second, ahead, behind = two_hosts
    _, token = await _family(first)
    await first.refresh.rotate(token, CLIENT)
    behind.advance(-first.settings.refresh_grace_seconds)  # 5.05 s before the first use
    with pytest.raises(RefreshError) as caught:
        await second.refresh.rotate(token, CLIENT)
    assert caught.value.reuse
