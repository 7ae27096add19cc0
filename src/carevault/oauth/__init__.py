"""OAuth 2.0 / OpenID Connect / SMART authorization server: clients, scopes, DPoP, replay."""
