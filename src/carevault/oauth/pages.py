"""The authorization server's HTML pages: sign in, second factor, consent (with the SMART patient
picker), and errors. Plain server-rendered forms with no script; every value is escaped, and the
pages may not be framed (a consent page in a frame is a clickjacking target) or cached."""

from __future__ import annotations

from html import escape

from fastapi.responses import HTMLResponse

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}"
    "label{display:block;margin:.8rem 0 .2rem}input,select{width:100%;padding:.4rem}"
    "button{margin:1rem .5rem 0 0;padding:.5rem 1.2rem}.error{color:#a00}"
)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} - carevault</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def _error(message: str | None) -> str:
    return f'<p class="error" role="alert">{escape(message)}</p>' if message else ""


def error_page(message: str, status: int = 400) -> HTMLResponse:
    """For a request that cannot be answered by redirecting to the client (unknown client,
    unregistered redirect URI): the browser stays here."""
    return _page("Cannot continue", f"<p>{escape(message)}</p>", status)


def login_page(
    client_name: str, request: str, csrf_token: str | None = None, error: str | None = None
) -> HTMLResponse:
    """`csrf_token`: the token of a session this browser already has (one not signed in),
    which the portal's CSRF check asks for on every POST carrying its cookie."""
    body = (
        f"<p><strong>{escape(client_name)}</strong> asks to use your carevault account.</p>"
        f"{_error(error)}"
        '<form method="post" action="/oauth/authorize/login">'
        f"{_hidden('request', request)}"
        f"{_hidden('csrf_token', csrf_token) if csrf_token else ''}"
        '<label for="username">User name</label>'
        '<input id="username" name="username" autocomplete="username" required>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" '
        'autocomplete="current-password" required>'
        '<button type="submit">Sign in</button></form>'
    )
    return _page("Sign in", body, 401 if error else 200)


def mfa_page(
    request: str, csrf_token: str, methods: list[str], error: str | None = None
) -> HTMLResponse:
    options = "".join(
        f'<option value="{escape(m)}">{escape(_METHOD_NAMES.get(m, m))}</option>'
        for m in methods
        if m in _METHOD_NAMES
    )
    body = (
        f"{_error(error)}"
        '<form method="post" action="/oauth/authorize/mfa">'
        f"{_hidden('request', request)}{_hidden('csrf_token', csrf_token)}"
        f'<label for="method">Method</label><select id="method" name="method">{options}</select>'
        '<label for="code">Code</label>'
        '<input id="code" name="code" autocomplete="one-time-code" required>'
        '<button type="submit">Continue</button></form>'
        "<p>To use a security key, sign in on the carevault portal first, then come back.</p>"
    )
    return _page("Second factor", body, 401 if error else 200)


_METHOD_NAMES = {"totp": "Authenticator app code", "recovery": "Recovery code"}


def consent_page(
    client_name: str,
    descriptions: list[str],
    request: str,
    csrf_token: str,
    patients: list[tuple[str, str]] | None,
    error: str | None = None,
) -> HTMLResponse:
    """`patients`: the choices of the SMART patient picker, (id, label), or None when the
    request needs no patient to be chosen."""
    items = "".join(f"<li>{escape(d)}</li>" for d in descriptions)
    picker = ""
    if patients is not None:
        options = "".join(
            f'<option value="{escape(pid)}">{escape(label)}</option>' for pid, label in patients
        )
        picker = (
            '<label for="patient">Patient</label>'
            f'<select id="patient" name="patient" required>{options}</select>'
        )
    body = (
        f"{_error(error)}"
        f"<p><strong>{escape(client_name)}</strong> asks to:</p><ul>{items}</ul>"
        '<form method="post" action="/oauth/authorize/consent">'
        f"{_hidden('request', request)}{_hidden('csrf_token', csrf_token)}{picker}"
        '<button type="submit" name="decision" value="approve">Allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
        "<p>You can withdraw this permission at any time.</p>"
    )
    return _page("Allow access?", body)
