"""Account administration: the operations behind `carevault user ...` (and later an admin API).

Disabling a user, changing their roles or resetting their password ends every session they
have at once.
"""

from __future__ import annotations

import secrets

from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.crypto.passwords import PasswordHasher
from carevault.identity.accounts import AccountError, User, UserStore, validate_links
from carevault.identity.password_policy import check_password
from carevault.identity.roles import Role
from carevault.tokens.sessions import SessionRevoker


def generate_password() -> str:
    """A random password that passes the policy (24 URL-safe characters, ~144 bits)."""
    while True:
        candidate = secrets.token_urlsafe(18)
        try:
            check_password(candidate)
            return candidate
        except ValueError:
            continue


class AccountAdmin:
    def __init__(
        self,
        users: UserStore,
        hasher: PasswordHasher,
        sessions: SessionRevoker,
        events: SecurityEventLog,
    ) -> None:
        self._users = users
        self._hasher = hasher
        self._sessions = sessions
        self._events = events

    async def _require(self, username: str) -> User:
        user = await self._users.by_username(username)
        if user is None:
            raise AccountError("not_found", "no such user")
        return user

    async def add_user(
        self,
        username: str,
        password: str,
        role: Role,
        *,
        organization_id: str | None = None,
        practitioner_id: str | None = None,
        patient_id: str | None = None,
        is_demo: bool = False,
    ) -> User:
        check_password(password, username=username)
        user = await self._users.create(
            username=username,
            password_hash=await self._hasher.hash(password),
            roles=[role],
            organization_id=organization_id,
            practitioner_id=practitioner_id,
            patient_id=patient_id,
            is_demo=is_demo,
        )
        await self._events.record(
            SecurityEvent("user_created", "success", user_id=user.id, details={"role": str(role)})
        )
        return user

    async def set_enabled(self, username: str, enabled: bool) -> User:
        user = await self._require(username)
        await self._users.set_enabled(user.id, enabled)
        if not enabled:
            await self._sessions.end_all(user.id, "disabled")
        await self._events.record(
            SecurityEvent(
                "user_enabled" if enabled else "user_disabled", "success", user_id=user.id
            )
        )
        return user

    async def set_role(self, username: str, role: Role) -> User:
        user = await self._require(username)
        validate_links([role], user.organization_id, user.practitioner_id, user.patient_id)
        await self._users.set_roles(user.id, [role])
        await self._sessions.end_all(user.id, "role_change")
        await self._events.record(
            SecurityEvent(
                "user_role_changed", "success", user_id=user.id, details={"role": str(role)}
            )
        )
        return user

    async def reset_password(self, username: str, password: str) -> User:
        user = await self._require(username)
        check_password(password, username=user.username)
        await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        await self._sessions.end_all(user.id, "password_reset")
        await self._events.record(SecurityEvent("password_reset", "success", user_id=user.id))
        return user
