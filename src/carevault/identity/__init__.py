"""Accounts, roles, password policy, login throttling."""
