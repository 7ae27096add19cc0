"""Reading the audit trail back: filtered, keyset-paged listings of entries, newest first.

A listing is one SQLAlchemy Core select shaped to the table's indexes: by patient
(`patient_id, seq`), by actor (`user_id, seq`) or by time (`at`, fixed-width ISO 8601 UTC text
that sorts as the instant does); a page ends where the next one starts (`before` = the last
sequence number shown), so paging never skips or repeats an entry while new ones arrive.

Query parameters are parsed here, strictly: an unknown parameter, a repeated one or a value
out of its range is an `InvalidQuery` naming the parameter (never echoing the value), which
the routes answer with 400.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from sqlalchemy import Select, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.audit.entry import Outcome, format_time
from carevault.db.engine import read_connection
from carevault.db.tables import audit_entries, users

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
MAX_SEQ = 2**62  # far beyond any trail; keeps every bound inside a 64-bit integer

FILTER_PARAMS = frozenset(
    {"patient", "actor", "action", "outcome", "since", "until", "break_glass", "limit", "before"}
)

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # a FHIR id (patient handles)
_ACTOR = re.compile(r"[A-Za-z0-9\-._@]{1,64}")  # user ids are UUIDs; be a little lenient
_ACTION = re.compile(r"[a-z0-9][a-z0-9._\-]{0,47}")
_INT = re.compile(r"[0-9]{1,19}")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})"
)
_BOOLEANS = {"true": True, "false": False}


class InvalidQuery(ValueError):
    """A query parameter that is unknown, repeated or out of range (named, value not kept)."""

    def __init__(self, param: str) -> None:
        self.param = param
        super().__init__(param)


@dataclass(frozen=True)
class AuditFilter:
    patient: str | None = None
    actor: str | None = None
    action: str | None = None  # exact action
    action_prefix: str | None = None  # from "fhir.*": every action starting with "fhir."
    outcome: Outcome | None = None
    since: str | None = None  # at >= since (fixed-width text)
    until: str | None = None  # at < until
    break_glass: bool | None = None
    exclude_actors: frozenset[str] = frozenset()  # entries of these users are left out
    limit: int = DEFAULT_LIMIT
    before: int | None = None  # only entries with seq < before (the paging cursor)


@dataclass(frozen=True)
class ListedEntry:
    seq: int
    document: dict[str, Any]  # the canonical entry, parsed
    mac: bytes


@dataclass(frozen=True)
class Page:
    entries: list[ListedEntry]
    next: int | None  # the `before` of the next page; None on the last one


# --- parsing ------------------------------------------------------------------------------------


def single_values(
    pairs: Iterable[tuple[str, str]], allowed: Iterable[str] = FILTER_PARAMS
) -> dict[str, str]:
    """The parameters as a dict: each at most once and all of them known."""
    known = frozenset(allowed)
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in known or name in values:
            raise InvalidQuery(name if name in known else "(unknown parameter)")
        values[name] = value
    return values


def parse_filter(values: dict[str, str]) -> AuditFilter:
    """An `AuditFilter` from `single_values(...)` of the listing's query string."""
    filt = AuditFilter()
    if "patient" in values:
        filt = replace(filt, patient=_match(values, "patient", _ID))
    if "actor" in values:
        filt = replace(filt, actor=_match(values, "actor", _ACTOR))
    if "action" in values:
        action = values["action"]
        if action.endswith("*"):
            stem = action[:-1]
            if stem and not _ACTION.fullmatch(stem):
                raise InvalidQuery("action")
            filt = replace(filt, action_prefix=stem)
        else:
            filt = replace(filt, action=_match(values, "action", _ACTION))
    if "outcome" in values:
        try:
            filt = replace(filt, outcome=Outcome(values["outcome"]))
        except ValueError:
            raise InvalidQuery("outcome") from None
    if "since" in values:
        filt = replace(filt, since=parse_instant(values["since"], "since"))
    if "until" in values:
        filt = replace(filt, until=parse_instant(values["until"], "until"))
    if "break_glass" in values:
        if values["break_glass"] not in _BOOLEANS:
            raise InvalidQuery("break_glass")
        filt = replace(filt, break_glass=_BOOLEANS[values["break_glass"]])
    if "limit" in values:
        filt = replace(filt, limit=parse_int(values["limit"], "limit", 1, MAX_LIMIT))
    if "before" in values:
        filt = replace(filt, before=parse_int(values["before"], "before", 1, MAX_SEQ))
    return filt


def parse_int(text: str, param: str, low: int, high: int) -> int:
    if not _INT.fullmatch(text):
        raise InvalidQuery(param)
    value = int(text)
    if not low <= value <= high:
        raise InvalidQuery(param)
    return value


def parse_instant(text: str, param: str) -> str:
    """An ISO 8601 date (midnight UTC) or date-time with `Z` or an offset, as the trail's
    fixed-width UTC text, which compares as the instant does."""
    try:
        if match := _DATE.fullmatch(text):
            year, month, day = (int(g) for g in match.groups())
            return format_time(dt.datetime(year, month, day, tzinfo=dt.UTC))
        match = _DATETIME.fullmatch(text)
        if match is None:
            raise InvalidQuery(param)
        year, month, day, hour, minute = (int(g) for g in match.groups()[:5])
        second = int(match.group(6) or 0)
        micro = int((match.group(7) or "0").ljust(6, "0")[:6])
        zone = match.group(8)
        if zone == "Z":
            tz = dt.UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise InvalidQuery(param)
            tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        at = dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        return format_time(at)
    except (ValueError, OverflowError):  # a day 31 of February, year 0, ...
        raise InvalidQuery(param) from None


def _match(values: dict[str, str], param: str, pattern: re.Pattern[str]) -> str:
    value = values[param]
    if not pattern.fullmatch(value):
        raise InvalidQuery(param)
    return value


# --- querying -----------------------------------------------------------------------------------


def _where(query: Select[Any], filt: AuditFilter) -> Select[Any]:
    c = audit_entries.c
    if filt.patient is not None:
        query = query.where(c.patient_id == filt.patient)
    if filt.actor is not None:
        query = query.where(c.user_id == filt.actor)
    if filt.exclude_actors:
        query = query.where(or_(c.user_id.is_(None), c.user_id.not_in(filt.exclude_actors)))
    if filt.action is not None:
        query = query.where(c.action == filt.action)
    if filt.action_prefix:
        # The stem's characters include no LIKE wildcard but "_": escape it.
        stem = filt.action_prefix.replace("\\", "\\\\").replace("_", "\\_")
        query = query.where(c.action.like(stem + "%", escape="\\"))
    if filt.outcome is not None:
        query = query.where(c.outcome == str(filt.outcome))
    if filt.since is not None:
        query = query.where(c.at >= filt.since)
    if filt.until is not None:
        query = query.where(c.at < filt.until)
    if filt.break_glass is not None:
        query = query.where(c.break_glass == filt.break_glass)
    if filt.before is not None:
        query = query.where(c.seq < filt.before)
    if filt.since is not None and filt.until is not None and filt.since >= filt.until:
        query = query.where(false())
    return query


async def list_entries(engine: AsyncEngine, filt: AuditFilter) -> Page:
    """One page of the entries matching `filt`, newest first."""
    c = audit_entries.c
    query = _where(select(c.seq, c.entry, c.mac), filt)
    query = query.order_by(c.seq.desc()).limit(filt.limit + 1)
    async with read_connection(engine) as conn:
        rows = (await conn.execute(query)).all()
    more = len(rows) > filt.limit
    rows = rows[: filt.limit]
    entries = [ListedEntry(row.seq, orjson.loads(row.entry), bytes(row.mac)) for row in rows]
    return Page(entries, entries[-1].seq if more and entries else None)


async def count_entries(engine: AsyncEngine, filt: AuditFilter) -> int:
    """How many entries match `filt` (its limit and cursor ignored)."""
    query = _where(select(func.count()).select_from(audit_entries), replace(filt, before=None))
    async with read_connection(engine) as conn:
        return int((await conn.execute(query)).scalar_one())


# --- the people behind the ids ------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    user_id: str
    username: str
    organization_id: str | None
    practitioner_id: str | None
    patient_id: str | None
    roles: tuple[str, ...] = ()  # the account's roles now (an entry keeps those it had)


async def actors(engine: AsyncEngine, user_ids: Iterable[str]) -> dict[str, Actor]:
    """The accounts behind the user ids of a page of entries (missing ids are left out)."""
    wanted = sorted({u for u in user_ids if u})
    if not wanted:
        return {}
    c = users.c
    found: dict[str, Actor] = {}
    async with read_connection(engine) as conn:
        for start in range(0, len(wanted), 500):
            rows = (
                await conn.execute(
                    select(
                        c.id,
                        c.username,
                        c.organization_id,
                        c.practitioner_id,
                        c.patient_id,
                        c.roles,
                    ).where(c.id.in_(wanted[start : start + 500]))
                )
            ).all()
            for row in rows:
                found[row.id] = Actor(
                    row.id,
                    row.username,
                    row.organization_id,
                    row.practitioner_id,
                    row.patient_id,
                    tuple(row.roles or ()),
                )
    return found


async def users_of_patient(engine: AsyncEngine, patient_id: str) -> frozenset[str]:
    """The accounts linked to a Patient: that patient's own logins."""
    async with read_connection(engine) as conn:
        rows = (
            await conn.execute(select(users.c.id).where(users.c.patient_id == patient_id))
        ).all()
    return frozenset(row.id for row in rows)
