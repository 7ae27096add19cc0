"""Account administration: the operations behind `carevault user ...` and the admin API
(identity/admin_routes.py).

Disabling a user, changing their roles or resetting their password ends every session they
have at once. Each change is a security event naming the account changed; `by` (the admin's
user id, "cli" from the command line) and the request's context say who and whence.
"""

from __future__ import annotations

import dataclasses
import secrets

from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.crypto.passwords import PasswordHasher
from carevault.identity.accounts import (
    USERNAME_PATTERN,
    AccountError,
    User,
    UserStore,
    normalize_username,
    validate_links,
)
from carevault.identity.authentication import RequestContext
from carevault.identity.password_policy import check_password
from carevault.identity.roles import Role
from carevault.tokens.sessions import SessionRevoker

CLI = "cli"
NO_CONTEXT = RequestContext()


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

    async def find(self, username: str) -> User:
        """The account, or `AccountError("not_found")` (also for a name no account could have:
        it is never looked up)."""
        name = normalize_username(username)
        user = await self._users.by_username(name) if USERNAME_PATTERN.fullmatch(name) else None
        if user is None:
            raise AccountError("not_found", "no such user")
        return user

    async def _record(
        self, event: str, user: User, by: str, ctx: RequestContext, **details: object
    ) -> None:
        await self._events.record(
            SecurityEvent(
                event,
                "success",
                user_id=user.id,
                source_address=ctx.address,
                request_id=ctx.request_id,
                details={"by": by, **details},
            )
        )

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

    async def set_enabled(
        self, username: str, enabled: bool, *, by: str = CLI, ctx: RequestContext = NO_CONTEXT
    ) -> User:
        user = await self.find(username)
        await self._users.set_enabled(user.id, enabled)
        sessions = [] if enabled else await self._sessions.end_all(user.id, "disabled")
        await self._record(
            "user_enabled" if enabled else "user_disabled",
            user,
            by,
            ctx,
            **({} if enabled else {"sessions": len(sessions)}),
        )
        return dataclasses.replace(user, enabled=enabled)

    async def set_role(self, username: str, role: Role) -> User:
        return await self.set_roles(username, [role])

    async def set_roles(
        self,
        username: str,
        roles: list[Role],
        *,
        by: str = CLI,
        ctx: RequestContext = NO_CONTEXT,
    ) -> User:
        """Replace the account's roles; a privilege change, so every session ends."""
        user = await self.find(username)
        roles = sorted(set(roles), key=list(Role).index)
        if not roles:
            raise AccountError("bad_roles", "an account needs at least one role")
        validate_links(roles, user.organization_id, user.practitioner_id, user.patient_id)
        await self._users.set_roles(user.id, roles)
        sessions = await self._sessions.end_all(user.id, "role_change")
        names = [str(r) for r in roles]
        await self._record(
            "user_role_changed",
            user,
            by,
            ctx,
            role=names[0],
            roles=names,
            previous=list(user.roles),
            sessions=len(sessions),
        )
        return dataclasses.replace(user, roles=tuple(names))

    async def reset_password(self, username: str, password: str) -> User:
        user = await self.find(username)
        check_password(password, username=user.username)
        await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        await self._sessions.end_all(user.id, "password_reset")
        await self._record("password_reset", user, CLI, NO_CONTEXT)
        return user
