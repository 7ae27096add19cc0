"""carevault: an authorization server and an encrypted, audited FHIR record server in one."""

__version__ = "0.1.0"
