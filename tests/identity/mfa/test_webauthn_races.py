"""Parallel WebAuthn registrations of one account: the credential limit holds however many
arrive at once, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import func, select

from carevault.db.tables import webauthn_credentials
from carevault.identity.authentication import RequestContext
from carevault.identity.mfa.webauthn import MAX_CREDENTIALS, CredentialLimit
from carevault.identity.roles import Role
from tests.identity.mfa.authenticator import SoftAuthenticator

PARALLEL = 2 * MAX_CREDENTIALS


async def test_parallel_registrations_stop_at_the_credential_limit(harness: Any) -> None:
    """Every registration has its own live challenge (one per session) and its own key, and
    all of them are verified at once: no more than MAX_CREDENTIALS may be stored. Each counts
    the account's credentials before it stores; on PostgreSQL (READ COMMITTED) they all counted
    the same few unless the account's row is locked first (15 of 20 were stored)."""
    credentials = harness.services.mfa.webauthn
    user = await harness.add_user("dr.many.keys", Role.physician)
    ctx = RequestContext(address="192.0.2.7")
    sessions = [f"sid:parallel-{i}" for i in range(PARALLEL)]
    responses = []
    for session in sessions:
        options = json.loads(await credentials.registration_options(user, session, ctx))
        responses.append(SoftAuthenticator().create(options))

    results = await asyncio.gather(
        *(
            credentials.register(user, session, response, None, ctx)
            for session, response in zip(sessions, responses, strict=True)
        ),
        return_exceptions=True,
    )

    unexpected = [r for r in results if isinstance(r, BaseException)]
    unexpected = [r for r in unexpected if not isinstance(r, CredentialLimit)]
    assert unexpected == []
    registered = [r for r in results if not isinstance(r, BaseException)]
    async with harness.services.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(func.count())
                .select_from(webauthn_credentials)
                .where(webauthn_credentials.c.user_id == user.id)
            )
        ).scalar_one()
    assert stored == len(registered) == MAX_CREDENTIALS
    assert len(await credentials.describe(user.id)) == MAX_CREDENTIALS
