"""authlib's OAuth 2.0 authorization server, wired to carevault's stores.

authlib decides the protocol: request validation, client authentication, the authorization code
grant with PKCE (RFC 7636), refresh (RFC 6749 §6), client credentials (§4.4), revocation
(RFC 7009), introspection (RFC 7662), the `iss` authorization response parameter (RFC 9207),
and the error responses of each. This module supplies what authlib leaves to its host: the
client model, the storage hooks and the token contents.

authlib is synchronous; carevault's stores are asynchronous. Each endpoint runs authlib in a
worker thread (`run`), and the hooks call back into the event loop with
`anyio.from_thread.run`, so no database call ever blocks the loop.
"""

from __future__ import annotations

import binascii
import functools
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.from_thread
import anyio.to_thread
import structlog
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    grants,
)
from authlib.oauth2.rfc6749.authenticate_client import authenticate_client_secret_basic
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc9207 import IssuerParameter
from joserfc import jws
from joserfc.errors import JoseError

from carevault.audit.events import SecurityEvent
from carevault.identity.accounts import User, UserStore
from carevault.identity.authentication import Authenticator, RequestContext
from carevault.oauth.client_assertion import ASSERTION_TYPE, AssertionRejected, ClientAssertions
from carevault.oauth.clients import Client, ClientRegistry
from carevault.oauth.codes import AuthorizationCode, AuthorizationCodes
from carevault.oauth.issuance import TokenIssuance, UserGrant
from carevault.oauth.scopes import covered, grantable, normalize, split
from carevault.tokens.access import AccessClaims, AccessTokenVerifier, InvalidTokenError
from carevault.tokens.refresh import Family, RefreshError, RefreshTokenService
from carevault.tokens.revocation import RevocationList
from carevault.tokens.sessions import SessionRevoker

T = TypeVar("T")
log = structlog.get_logger("carevault.oauth")
# Which client authentication each endpoint accepts; a client is held to its registered one.
TOKEN_AUTH_METHODS = ["private_key_jwt", "client_secret_basic", "none"]
CONFIDENTIAL_AUTH_METHODS = ["private_key_jwt", "client_secret_basic"]


def _sync(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run a coroutine function on the event loop from authlib's worker thread."""
    return anyio.from_thread.run(functools.partial(fn, *args, **kwargs))


class DpopRequired(Exception):
    """The client must prove a DPoP key for this request (`require_dpop`, or a bound grant)."""


# --- what authlib sees of carevault --------------------------------------------------------


class _Payload(OAuth2Payload):
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for name, value in pairs:
            self._datalist[name].append(value)
        self._data = {name: values[0] for name, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class Request(OAuth2Request):
    """One HTTP request as authlib reads it, plus what carevault learned about it before
    (the request's context for the security events and, for a token request, the thumbprint
    of the DPoP key it proved)."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        query: list[tuple[str, str]],
        form: list[tuple[str, str]],
        ctx: RequestContext,
        jkt: str | None = None,
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._args = dict(query)
        self._form = dict(form)
        self.payload = _Payload(query if method == "GET" else form)
        self.ctx = ctx
        self.jkt = jkt
        self.granted_scope: list[str] = []  # the requested scopes, normalized, once allowed

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


@dataclass(frozen=True)
class ClientModel(ClientMixin):  # type: ignore[misc]
    client: Client
    check_secret: Callable[[Client, str], bool]

    def get_client_id(self) -> str:
        return self.client.id

    def get_default_redirect_uri(self) -> str | None:
        # Only when exactly one is registered: otherwise the request must say which.
        uris = self.client.redirect_uris
        return uris[0] if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        granted = grantable(scope, self.client.allowed_scopes())
        return None if granted is None else " ".join(granted)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Exact match, no patterns; except that a loopback redirect may use any port (RFC
        8252 §7.3: a native app listens on whichever port the system gives it)."""
        if redirect_uri in self.client.redirect_uris:
            return True
        return _without_loopback_port(redirect_uri) in {
            _without_loopback_port(uri) for uri in self.client.redirect_uris
        } - {None}

    def check_client_secret(self, client_secret: str) -> bool:
        return self.check_secret(self.client, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.client.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and self.client.allows_grant("authorization_code")

    def check_grant_type(self, grant_type: str) -> bool:
        return self.client.allows_grant(grant_type)


@dataclass(frozen=True)
class Authorization:
    """The resource owner's approval, handed to authlib as its `grant_user`."""

    user: User
    amr: list[str]
    acr: str | None
    auth_time: int
    patient: str | None = None


@dataclass
class Response:
    """What an endpoint answers; `location` is settable for the RFC 9207 extension."""

    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def location(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "location"), None)

    @location.setter
    def location(self, value: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != "location"]
        self.headers.append(("Location", value))


# --- grants ------------------------------------------------------------------------------


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client, S256 only: a request without a challenge, or asking for
    "plain" (or leaving the method out, which RFC 7636 §4.3 reads as "plain"), is refused."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge (S256).")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier'.")
        super().validate_code_verifier(grant, result)

    def get_authorization_code_challenge(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: Any) -> str:
        return "S256"


def _require_dpop_if_needed(client: Client, jkt: str | None) -> None:
    if client.require_dpop and jkt is None:
        raise DpopRequired


class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    server: OAuthServer
    request: Request

    def validate_requested_scope(self) -> None:
        """Every scope must be one this client may be given (normalized; v1 names accepted),
        and none a back-end service's (`system/` is for client credentials only). Runs once the
        client and redirect URI are trusted, so its errors go back to the client."""
        data = self.request.payload.data
        if "request" in data or "request_uri" in data:
            raise RequestObjectNotSupported()
        for name, limit in (("nonce", 512), ("dpop_jkt", 64), ("state", 1024)):
            value = data.get(name)
            if value is not None and (len(value) > limit or not value.isprintable()):
                raise InvalidRequestError(f"Malformed '{name}'.")
        scope = self.request.payload.scope
        granted = grantable(scope, self.request.client.client.allowed_scopes()) if scope else None
        if not granted or any(s.startswith("system/") for s in granted):
            raise InvalidScopeError("A requested scope is not allowed for this client.")
        self.request.granted_scope = granted

    def generate_authorization_code(self) -> str:
        """Issue and store the code in one step (the store makes the random value)."""
        request = self.request
        approval: Authorization = request.user
        payload = request.payload.data
        return _sync(
            self.server.codes.issue,
            client_id=request.client.client.id,
            user_id=approval.user.id,
            # "" when the request named none: then the token request may not either
            # (RFC 6749 §4.1.3)
            redirect_uri=request.payload.redirect_uri or "",
            scope=" ".join(request.granted_scope),
            code_challenge=payload["code_challenge"],
            nonce=payload.get("nonce"),
            patient=approval.patient,
            dpop_jkt=payload.get("dpop_jkt"),
            amr=approval.amr,
            acr=approval.acr,
            auth_time=approval.auth_time,
        )

    def save_authorization_code(self, code: str, request: Request) -> None:
        """Nothing to do: `generate_authorization_code` stored it."""

    def query_authorization_code(self, code: str, client: ClientModel) -> AuthorizationCode | None:
        redemption = _sync(self.server.codes.redeem, code, client.client.id)
        if redemption.replayed_family is not None:
            # RFC 6749 §4.1.2: a code used twice revokes what it produced.
            _sync(self.server.code_replayed, redemption, client.client, self.request.ctx)
        return redemption.code

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: `redeem` marked the code used before anything was issued."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        user = _sync(self.server.users.by_id, authorization_code.user_id)
        return user if user is not None and user.enabled else None

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        code: AuthorizationCode = request.authorization_code
        client: Client = request.client.client
        _require_dpop_if_needed(client, request.jkt)
        if code.dpop_jkt is not None and code.dpop_jkt != request.jkt:
            raise InvalidGrantError("The DPoP key is not the one the code is bound to.")
        user = self.authenticate_user(code)
        if user is None:
            raise InvalidGrantError()
        grant = UserGrant(
            client=client,
            user=user,
            scope=split(code.scope),
            amr=code.amr,
            acr=code.acr,
            auth_time=code.auth_time,
            patient=code.patient,
            nonce=code.nonce,
        )
        body = _sync(self.server.start_grant, grant, code, request.jkt, request.ctx)
        return 200, body, self.TOKEN_RESPONSE_HEADER


@dataclass(frozen=True)
class RefreshCredential:
    family: Family
    token: str

    def check_client(self, client: ClientModel) -> bool:
        return self.family.client_id == client.client.id

    def get_scope(self) -> str:
        return self.family.scope


class RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True
    server: OAuthServer
    request: Request

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshCredential | None:
        """Look only: the token is rotated once every other check has passed, so a refused
        request (a wider scope, a missing proof) does not burn it."""
        client: Client = self.request.client.client
        try:
            family = _sync(self.server.refresh.peek, refresh_token, client.id)
        except RefreshError:
            family = None
        if family is None:
            # Rotation records the failure, or the reuse alarm for a used token.
            try:
                _sync(self.server.rotate, refresh_token, client.id, self.request.ctx)
            except RefreshError:
                return None
            raise InvalidGrantError()  # unreachable in practice: peek refused, rotate accepted
        return RefreshCredential(family, refresh_token)

    def _validate_token_scope(self, token: RefreshCredential) -> None:
        """A refresh may narrow the scope, never widen it (RFC 6749 §6)."""
        requested = self.request.payload.scope
        if not requested:
            return
        original = split(token.family.scope)
        for scope in split(requested):
            v2 = normalize(scope)
            if v2 is None or not covered(v2, original):
                raise InvalidScopeError("The requested scope exceeds the original grant.")

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        credential: RefreshCredential = request.refresh_token
        client: Client = request.client.client
        _require_dpop_if_needed(client, request.jkt)
        bound = credential.family.dpop_jkt
        if bound is not None and bound != request.jkt:
            raise InvalidGrantError("The refresh token is bound to another DPoP key.")
        requested = request.payload.scope
        scope = (
            [normalize(s) for s in split(requested)]
            if requested
            else split(credential.family.scope)
        )
        try:
            body = _sync(
                self.server.refresh_grant,
                credential,
                client,
                [s for s in scope if s],
                request.jkt,
                request.ctx,
            )
        except RefreshError:
            raise InvalidGrantError() from None
        return 200, body, self.TOKEN_RESPONSE_HEADER


class ServiceGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    """SMART Backend Services: only `system/` scopes, only confidential clients."""

    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS
    server: OAuthServer
    request: Request

    def validate_token_request(self) -> None:
        super().validate_token_request()
        requested = self.request.payload.scope
        client: Client = self.request.client.client
        granted = grantable(requested, client.allowed_scopes())
        if not requested or granted is None or not all(s.startswith("system/") for s in granted):
            raise InvalidScopeError("Only the client's system/ scopes can be requested.")
        self.request.granted_scope = granted

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        client: Client = request.client.client
        _require_dpop_if_needed(client, request.jkt)
        body = self.server.issuance.for_service(client, request.granted_scope, jkt=request.jkt)
        _sync(
            self.server.record,
            "token_issued",
            client,
            None,
            request.ctx,
            grant="client_credentials",
        )
        return 200, body, self.TOKEN_RESPONSE_HEADER


# --- revocation and introspection -----------------------------------------------------------


@dataclass(frozen=True)
class KnownToken:
    """A token this server issued, as revocation and introspection see it."""

    kind: str  # access_token | refresh_token
    client_id: str
    family: Family | None = None
    claims: AccessClaims | None = None
    revoked: bool = False

    def check_client(self, client: ClientModel) -> bool:
        return self.client_id == client.client.id

    def is_expired(self) -> bool:
        return False  # expired tokens are never returned by `find_token`

    def is_revoked(self) -> bool:
        return self.revoked

    def get_scope(self) -> str:
        if self.claims is not None:
            return self.claims.scope
        return self.family.scope if self.family is not None else ""


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS
    server: OAuthServer

    def authenticate_token(self, request: Request, client: ClientModel) -> KnownToken | None:
        """Another client's token is left alone and answered like an unknown one (200), so
        the endpoint tells no one whether a token exists."""
        self.check_params(request, client)
        token = self.query_token(request.form["token"], request.form.get("token_type_hint"))
        return token if token is not None and token.check_client(client) else None

    def query_token(self, token_string: str, token_type_hint: str | None) -> KnownToken | None:
        return _sync(self.server.find_token, token_string, token_type_hint)

    def revoke_token(self, token: KnownToken, request: Request) -> None:
        _sync(self.server.revoke, token, request.ctx)


class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS
    server: OAuthServer

    def query_token(self, token_string: str, token_type_hint: str | None) -> KnownToken | None:
        return _sync(self.server.find_token, token_string, token_type_hint)

    def check_permission(self, token: KnownToken, client: ClientModel, request: Request) -> bool:
        # A client learns about its own tokens only (RFC 7662 §4: limit what leaks).
        return token.check_client(client)

    def introspect_token(self, token: KnownToken) -> dict[str, Any]:
        if token.claims is not None:
            claims = token.claims
            body: dict[str, Any] = {
                "active": True,
                "token_type": "DPoP" if claims.jkt else "Bearer",
                "client_id": claims.client_id,
                "scope": claims.scope,
                "sub": claims.sub,
                "exp": claims.exp,
                "iat": claims.iat,
                "iss": self.server.issuer,
                "jti": claims.jti,
            }
            if claims.jkt:
                body["cnf"] = {"jkt": claims.jkt}
            return body
        family = token.family
        assert family is not None
        return {  # no token_type: RFC 7662's is the type of an access token
            "active": True,
            "client_id": family.client_id,
            "scope": family.scope,
            "sub": family.user_id,
            "exp": int(family.expires_at),
            "iss": self.server.issuer,
        }


class Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def get_issuer(self) -> str:
        return self._issuer


# --- the server ----------------------------------------------------------------------------


class OAuthServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        issuer: str,
        clients: ClientRegistry,
        codes: AuthorizationCodes,
        issuance: TokenIssuance,
        assertions: ClientAssertions,
        authenticator: Authenticator,
        refresh: RefreshTokenService,
        sessions: SessionRevoker,
        revocations: RevocationList,
        verifier: AccessTokenVerifier,
        users: UserStore,
        events: Any,
    ) -> None:
        super().__init__()
        self.issuer = issuer
        self.clients = clients
        self.codes = codes
        self.issuance = issuance
        self.assertions = assertions
        self.authenticator = authenticator
        self.refresh = refresh
        self.sessions = sessions
        self.revocations = revocations
        self.verifier = verifier
        self.users = users
        self.events = events
        self.issuer_parameter = Issuer(issuer)
        self.register_grant(CodeGrant, [S256Challenge(required=True)])
        self.register_grant(RefreshGrant)
        self.register_grant(ServiceGrant)
        self.register_endpoint(Revocation)
        self.register_endpoint(Introspection)
        self.register_extension(self.issuer_parameter)
        self.register_client_auth_method("private_key_jwt", self._authenticate_assertion)
        self.register_client_auth_method("client_secret_basic", _secret_basic)

    # authlib's host interface
    def query_client(self, client_id: str) -> ClientModel | None:
        if not isinstance(client_id, str) or not client_id:
            return None
        client = _sync(self.clients.get, client_id)
        if client is None or not client.enabled:
            return None
        return ClientModel(client, self.clients.check_secret)

    def save_token(self, token: dict[str, Any], request: Request) -> None:
        """Nothing to do: the grants persist what they issue as they issue it."""

    def create_oauth2_request(self, request: Request) -> Request:
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        return Response(status, body, list(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """authlib's signals are not used."""

    def _authenticate_assertion(self, query_client: Any, request: Request) -> ClientModel | None:
        form = request.form
        assertion = form.get("client_assertion")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
            return None
        client = self.query_client(form.get("client_id") or _unverified_issuer(assertion))
        if client is None:
            raise InvalidClientError(status_code=401)
        try:
            _sync(self.assertions.verify, assertion, client.client)
        except AssertionRejected as err:
            _sync(
                self.record,
                "client_auth",
                client.client,
                None,
                request.ctx,
                outcome="failure",
                reason=err.reason,
            )
            raise InvalidClientError(status_code=401) from None
        return client

    # run an endpoint
    async def run(self, fn: Callable[[], T]) -> T:
        """Run authlib off the event loop. Input that authlib cannot even describe in an error
        (it refuses control characters in its own error text with a ValueError) is an
        invalid request like any other."""
        try:
            return await anyio.to_thread.run_sync(fn)
        except (ValueError, UnicodeError) as err:
            log.info("oauth_request_refused", error_type=type(err).__name__)
            raise InvalidRequestError() from None

    def token(self, request: Request) -> Response:
        return self.create_token_response(request)

    def endpoint(self, name: str, request: Request) -> Response:
        return self.create_endpoint_response(name, request)

    def consent_grant(self, request: Request) -> Any:
        """The validated authorization request (raises `OAuth2Error`)."""
        return self.get_consent_grant(request)

    def authorize(self, request: Request, grant: Any, approval: Authorization | None) -> Response:
        return self.create_authorization_response(request, grant_user=approval, grant=grant)

    def error_redirect(self, request: Request, error: OAuth2Error) -> Response:
        response = self.handle_error_response(request, error)
        if response.location:
            self.issuer_parameter.add_issuer_parameter(self, response)
        return response

    # the async side, called from the grants through `_sync`
    async def start_grant(
        self, grant: UserGrant, code: AuthorizationCode, jkt: str | None, ctx: RequestContext
    ) -> dict[str, Any]:
        body, family = await self.issuance.start(grant, code.family_id, jkt=jkt, ctx=ctx)
        await self.record(
            "token_issued",
            grant.client,
            grant.user.id,
            ctx,
            grant="authorization_code",
            session=family.id,
        )
        return body

    async def rotate(self, token: str, client_id: str, ctx: RequestContext) -> None:
        await self.authenticator.rotate_refresh(token, ctx, client_id)

    async def refresh_grant(
        self,
        credential: RefreshCredential,
        client: Client,
        scope: list[str],
        jkt: str | None,
        ctx: RequestContext,
    ) -> dict[str, Any]:
        rotation, user = await self.authenticator.rotate_refresh(credential.token, ctx, client.id)
        family = rotation.family
        grant = UserGrant(
            client=client,
            user=user,
            scope=scope,
            amr=family.amr,
            acr=family.acr,
            auth_time=family.auth_time,
            patient=family.patient,
        )
        return self.issuance.refreshed(grant, family, rotation.refresh_token, jkt=jkt)

    async def end_session(self, family_id: str, reason: str) -> None:
        """End a grant's session: its refresh tokens and its access tokens."""
        await self.refresh.revoke_family(family_id, reason)
        await self.sessions.end_family(family_id)

    async def code_replayed(self, redemption: Any, client: Client, ctx: RequestContext) -> None:
        await self.end_session(redemption.replayed_family, "code_reuse")
        await self.record(
            "code_reuse",
            client,
            redemption.replayed_user,
            ctx,
            outcome="alert",
            session=redemption.replayed_family,
        )

    async def find_token(self, token: str, hint: str | None) -> KnownToken | None:
        if not isinstance(token, str) or not token or len(token) > 8192:
            return None
        if token.count(".") == 2:
            try:
                claims = self.verifier.verify(token)
            except InvalidTokenError:
                return None
            revoked = await self.revocations.is_revoked(claims)
            return KnownToken("access_token", claims.client_id, claims=claims, revoked=revoked)
        found = await self.refresh.lookup(token)
        if found is None:
            return None
        family, active = found
        return KnownToken("refresh_token", family.client_id, family=family, revoked=not active)

    async def revoke(self, token: KnownToken, ctx: RequestContext) -> None:
        if token.family is not None:
            await self.end_session(token.family.id, "revoked")
        elif token.claims is not None:
            await self.revocations.revoke_token(token.claims.jti, token.claims.exp)
        await self.record(
            "token_revoked", None, None, ctx, client_id=token.client_id, kind=token.kind
        )

    async def record(
        self,
        event: str,
        client: Client | None,
        user_id: str | None,
        ctx: RequestContext,
        *,
        outcome: str = "success",
        client_id: str | None = None,
        **details: Any,
    ) -> None:
        await self.events.record(
            SecurityEvent(
                event,
                outcome,
                user_id=user_id,
                client_id=client.id if client is not None else client_id,
                source_address=ctx.address,
                request_id=ctx.request_id,
                details=details,
            )
        )


def _without_loopback_port(uri: str) -> str | None:
    """An http loopback URI with its port removed; None for any other URI."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "::1"):
        return None
    host = "[::1]" if parts.hostname == "::1" else parts.hostname
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class RequestObjectNotSupported(OAuth2Error):  # type: ignore[misc]
    """OpenID Connect Core §6: request objects are not supported (yet: pushed authorization
    requests, RFC 9126, would arrive as a `request_uri` this server issued)."""

    error = "request_not_supported"


def _secret_basic(query_client: Any, request: Request) -> ClientModel | None:
    """authlib's `client_secret_basic`, for well-formed credentials only: a header that is not
    base64 of UTF-8 authenticates nobody (authlib would raise a decoding error)."""
    try:
        return authenticate_client_secret_basic(query_client, request)  # type: ignore[no-any-return]
    except (UnicodeDecodeError, ValueError, binascii.Error):
        return None


def _unverified_issuer(assertion: str) -> str:
    """The `iss` of a client assertion, read only to find which client's keys verify it (the
    signature check that follows decides; RFC 7523 §3 makes `client_id` optional)."""
    try:
        value = json.loads(jws.extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError, TypeError):
        return ""
    issuer = value.get("iss") if isinstance(value, dict) else None
    return issuer if isinstance(issuer, str) and len(issuer) <= 64 else ""
