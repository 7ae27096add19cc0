"""Browser sessions for the web portal: a server-side session store, the `__Host-` cookie,
CSRF protection, and the user's list of sessions."""
