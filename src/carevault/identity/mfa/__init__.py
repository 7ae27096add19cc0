"""Multi-factor authentication: second factors (TOTP, WebAuthn, recovery codes), the two-step
login, enrollment-scoped tokens and step-up."""
