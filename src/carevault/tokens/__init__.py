"""JWT access tokens (RFC 9068), signing keys and JWKS, refresh token families, revocation."""
