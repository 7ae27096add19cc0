"""`create_app(settings)`: wires routers, middleware and lifespan; nothing else."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI

from carevault import __version__
from carevault.access.routes import router as access_router
from carevault.audit.events import SecurityEvent
from carevault.audit.middleware import AuditTrail, unavailable_response
from carevault.audit.report import router as access_report_router
from carevault.audit.routes import router as audit_router
from carevault.audit.writer import AuditUnavailable
from carevault.config import Settings
from carevault.edge import openapi, problems
from carevault.edge.cors import ListedOriginsCORS
from carevault.edge.headers import SecurityHeaders
from carevault.edge.limits import RequestLimits
from carevault.edge.metrics import router as metrics_router
from carevault.edge.rate_limit import RateLimit
from carevault.edge.request_context import RequestContext
from carevault.fhir.authorization import AccessDenied
from carevault.fhir.bundle_routes import router as fhir_bundle_router
from carevault.fhir.routes import FhirError, access_denied_response, error_response
from carevault.fhir.routes import router as fhir_router
from carevault.health import router as health_router
from carevault.identity.accounts import ProfileCache
from carevault.identity.admin_routes import router as admin_router
from carevault.identity.mfa.routes import router as mfa_router
from carevault.identity.mfa.webauthn_routes import router as webauthn_router
from carevault.identity.routes import router as auth_router
from carevault.identity.web.csrf import CsrfProtection
from carevault.identity.web.routes import router as session_router
from carevault.oauth.client_routes import router as client_admin_router
from carevault.oauth.metadata import router as oauth_metadata_router
from carevault.oauth.provider import build_oauth, oauth_offered, warn_if_oauth_unavailable
from carevault.oauth.routes import router as oauth_router
from carevault.runtime import Services, build_services
from carevault.serving import tune_for_serving
from carevault.tokens.routes import router as jwks_router


def configuration_event(settings: Settings, services: Services) -> SecurityEvent:
    """The configuration a server starts with, as digests (an auditor compares them across
    starts to see when settings or the access policy changed; secrets are masked first)."""
    return SecurityEvent(
        "server_started",
        "success",
        details={
            "version": __version__,
            "settings_sha256": hashlib.sha256(settings.model_dump_json().encode()).hexdigest(),
            "policy_sha256": hashlib.sha256(services.policy.model_dump_json().encode()).hexdigest(),
        },
    )


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or build_services(settings)
    oauth = build_oauth(services, services.clock)
    warn_if_oauth_unavailable(settings.issuer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        await services.events.record(configuration_event(settings, services))
        tune_for_serving()
        try:
            yield
        finally:
            await oauth.close()
            await services.close()

    app = FastAPI(
        title="carevault",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        debug=False,  # never render tracebacks, whatever CAREVAULT_DEBUG says
    )
    app.state.services = services
    app.state.profiles = ProfileCache(services.users)
    app.state.oauth = oauth
    problems.install(app)
    app.include_router(health_router)
    # Routes are matched in order: the record server's, the busiest, first. None of the
    # others starts with /fhir, so they lose a failed prefix match per FHIR route, no more.
    app.include_router(access_report_router)  # before the /fhir/{type}/... routes
    app.include_router(fhir_bundle_router)  # POST /fhir, before the /fhir/{type} routes
    app.include_router(fhir_router)
    app.include_router(metrics_router)
    app.include_router(jwks_router)
    app.include_router(auth_router)
    app.include_router(mfa_router)
    app.include_router(webauthn_router)
    app.include_router(session_router)
    app.include_router(admin_router)
    app.include_router(client_admin_router)
    oauth_only = [Depends(oauth_offered)]
    app.include_router(oauth_router, dependencies=oauth_only)
    app.include_router(oauth_metadata_router, dependencies=oauth_only)
    app.include_router(access_router)
    app.include_router(audit_router)
    app.add_exception_handler(FhirError, error_response)  # type: ignore[arg-type]
    app.add_exception_handler(AccessDenied, access_denied_response)  # type: ignore[arg-type]
    app.add_exception_handler(AuditUnavailable, unavailable_response)
    # Inside the audit trail (a refused write is recorded) and the body limits (a form is read).
    app.add_middleware(
        CsrfProtection,
        sessions=services.browser_sessions,
        events=services.events,
        trusted_proxies=settings.trusted_proxies,
    )
    app.add_middleware(
        AuditTrail,
        writer=services.audit_writer,
        secret=services.secrets.subject_hash,
        trusted_proxies=settings.trusted_proxies,
    )
    app.add_middleware(RequestLimits, settings=settings)
    # The edge, outermost last: every answer (a 413, a 429, a preflight) gets the request id,
    # the log line, the metrics and the security headers.
    app.add_middleware(RateLimit, settings=settings, services=services)
    # CORS: a listed origin only, never "*"; credentials for listed origins alone (edge/cors.py).
    app.add_middleware(
        ListedOriginsCORS,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "DPoP",
            "If-Match",
            "If-None-Match",
            "Prefer",
            "X-CSRF-Token",
            "X-Request-ID",
        ],
        expose_headers=[
            "ETag",
            "Location",
            "Retry-After",
            "RateLimit",
            "RateLimit-Policy",
            "X-Request-ID",
            "WWW-Authenticate",
            "DPoP-Nonce",
        ],
        allow_credentials=True,
        max_age=settings.cors_max_age_seconds,
    )
    app.add_middleware(SecurityHeaders, settings=settings)
    app.add_middleware(RequestContext, settings=settings)
    openapi.install(app)
    return app
