"""Cryptographic building blocks: password hashing, secret files, keyed hashes."""
