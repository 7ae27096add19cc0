"""The long-lived objects of one process, built from `Settings` (shared by the app and the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.access.alerts import AlertSinks
from carevault.access.break_glass import BreakGlass
from carevault.access.control import AccessControl
from carevault.access.facts import AccessFacts
from carevault.access.generation import AccessGeneration
from carevault.access.policy import Policy, load_policy
from carevault.audit.alerts import AlertRules
from carevault.audit.events import SecurityEventLog
from carevault.audit.log import AuditLog
from carevault.audit.writer import AuditWriter
from carevault.config import Settings
from carevault.crypto.blind_index import BlindIndex
from carevault.crypto.custody import KeyCustody, ensure_keys, master_key_value
from carevault.crypto.envelope import EnvelopeCipher
from carevault.crypto.instance_secrets import InstanceSecrets, load_or_create
from carevault.crypto.passwords import PasswordHasher
from carevault.db.engine import create_engine, create_vault_engine, dispose
from carevault.fhir.compartment import PatientCompartment
from carevault.fhir.store import ResourceStore
from carevault.identity.accounts import UserStore
from carevault.identity.admin import AccountAdmin
from carevault.identity.authentication import Authenticator
from carevault.identity.mfa.challenges import ChallengeStore
from carevault.identity.mfa.recovery import RecoveryCodes
from carevault.identity.mfa.service import MfaService
from carevault.identity.mfa.totp import TotpFactors
from carevault.identity.mfa.webauthn import WebAuthnCredentials
from carevault.identity.throttle import LoginThrottle
from carevault.identity.web.sessions import BrowserSessions
from carevault.oauth.clients import ClientRegistry
from carevault.tokens.access import AccessTokenIssuer, AccessTokenVerifier
from carevault.tokens.keys import KeyRing, create_keyset
from carevault.tokens.refresh import RefreshTokenService
from carevault.tokens.revocation import (
    DatabaseRevocationList,
    RedisRevocationList,
    RevocationList,
)
from carevault.tokens.sessions import SessionRevoker
from carevault.tokens.signal import ChangeSignal


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    vault_engine: AsyncEngine  # the key vault: wrapped data keys, apart from the data
    secrets: InstanceSecrets
    keyring: KeyRing
    issuer: AccessTokenIssuer
    verifier: AccessTokenVerifier
    revocations: RevocationList
    refresh: RefreshTokenService
    sessions: SessionRevoker
    hasher: PasswordHasher
    users: UserStore
    audit: AuditLog
    audit_writer: AuditWriter
    events: SecurityEventLog
    throttle: LoginThrottle
    authenticator: Authenticator
    accounts: AccountAdmin
    signal: ChangeSignal
    custody: KeyCustody
    envelope: EnvelopeCipher
    blind_index: BlindIndex
    store: ResourceStore
    policy: Policy
    access_generation: AccessGeneration
    alerts: AlertSinks
    break_glass: BreakGlass
    access: AccessControl  # the FHIR routes' one door to the decision point
    mfa: MfaService
    browser_sessions: BrowserSessions
    clients: ClientRegistry
    clock: Callable[[], float] = time.time
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.revocations.start()
        self._tasks.append(asyncio.create_task(self.audit_writer.run_checkpoints()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.audit_writer.drain()
        with contextlib.suppress(Exception):
            await self.audit.checkpoint()  # the entries of this run end under a signed head
        await self.audit.close()
        await self.alerts.close()
        await self.revocations.close()
        await dispose(self.engine)
        await dispose(self.vault_engine)
        self.hasher.close()
        self.signal.close()
        self.envelope.close()
        self.access_generation.close()


def ensure_key_material(settings: Settings) -> None:
    """Create the data directory's secrets on first use (0700 directory, 0600 files)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.keys_dir.mkdir(exist_ok=True, mode=0o700)
    create_keyset(settings.keys_dir, settings.signing_algorithm)
    load_or_create(settings.keys_dir)
    ensure_keys(settings.keys_dir, master_key_value(settings))


def build_services(settings: Settings, clock: Callable[[], float] = time.time) -> Services:
    ensure_key_material(settings)
    engine = create_engine(settings)
    instance_secrets = load_or_create(settings.keys_dir)
    keyring = KeyRing(settings.keys_dir, settings.key_reload_interval_seconds)
    signal = ChangeSignal(settings.data_dir / "revocation.signal")
    revocations: RevocationList
    if settings.redis_url:
        revocations = RedisRevocationList(engine, settings.redis_url, clock)
    else:
        revocations = DatabaseRevocationList(engine, signal, clock)
    refresh = RefreshTokenService(settings, engine, instance_secrets, clock)
    sessions = SessionRevoker(settings, refresh, revocations, clock)
    hasher = PasswordHasher(settings)
    users = UserStore(engine)
    custody = KeyCustody.from_settings(settings)
    audit = AuditLog(engine, custody.audit_keys)
    alerts = AlertSinks(settings)
    audit_writer = AuditWriter(
        audit,
        checkpoint_every=settings.audit_checkpoint_entries,
        checkpoint_seconds=settings.audit_checkpoint_seconds,
        rules=AlertRules(settings),
        sinks=alerts,
    )
    events = SecurityEventLog(audit_writer)
    throttle = LoginThrottle(settings, engine, clock)
    vault_engine = create_vault_engine(settings)
    envelope = EnvelopeCipher(
        vault_engine,
        custody,
        cache_size=settings.dek_cache_size,
        cache_ttl_seconds=settings.dek_cache_ttl_seconds,
        # a separate counter from revocations': a destroy must not make workers re-read those
        signal=ChangeSignal(settings.data_dir / "dek.signal"),
        clock=clock,
    )
    blind_index = BlindIndex(custody.index_prf())
    access_generation = AccessGeneration(
        engine,
        ChangeSignal(settings.data_dir / "access.signal"),
        settings.access_generation_poll_seconds,
    )
    store = ResourceStore(
        engine, envelope, blind_index, shared_compartment(), clock, access_generation
    )
    issuer = AccessTokenIssuer(settings, keyring, clock)
    authenticator = Authenticator(
        users=users,
        hasher=hasher,
        throttle=throttle,
        events=events,
        refresh=refresh,
        issuer=issuer,
        sessions=sessions,
        instance_secrets=instance_secrets,
        clock=clock,
    )
    mfa = MfaService(
        settings=settings,
        users=users,
        authenticator=authenticator,
        issuer=issuer,
        challenges=ChallengeStore(engine, clock),
        totp=TotpFactors(settings, engine, envelope, clock),
        recovery=RecoveryCodes(engine, instance_secrets, clock),
        sessions=sessions,
        events=events,
        clock=clock,
    )
    mfa.webauthn = WebAuthnCredentials(settings, engine, mfa.challenges, events, clock)
    authenticator.mfa = mfa
    browser_sessions = BrowserSessions(settings, engine, clock)
    sessions.browser = browser_sessions
    policy = load_policy(settings.access_policy_file)
    facts = AccessFacts(engine, store, users, access_generation, clock)
    break_glass = BreakGlass(
        engine, envelope, events, policy, settings, access_generation, alerts, clock
    )
    facts.grant_source = break_glass
    return Services(
        settings=settings,
        engine=engine,
        vault_engine=vault_engine,
        secrets=instance_secrets,
        keyring=keyring,
        issuer=issuer,
        verifier=AccessTokenVerifier(settings, keyring, clock),
        revocations=revocations,
        refresh=refresh,
        sessions=sessions,
        hasher=hasher,
        users=users,
        audit=audit,
        audit_writer=audit_writer,
        events=events,
        throttle=throttle,
        authenticator=authenticator,
        accounts=AccountAdmin(users, hasher, sessions, events),
        signal=signal,
        custody=custody,
        envelope=envelope,
        blind_index=blind_index,
        store=store,
        policy=policy,
        access_generation=access_generation,
        alerts=alerts,
        break_glass=break_glass,
        access=AccessControl(policy, facts, clock),
        mfa=mfa,
        browser_sessions=browser_sessions,
        clients=ClientRegistry(engine, instance_secrets, clock),
        clock=clock,
    )


@functools.cache
def shared_compartment() -> PatientCompartment:
    """The Patient compartment is read-only data that takes ~0.25 s to compile: once a process."""
    return PatientCompartment()
