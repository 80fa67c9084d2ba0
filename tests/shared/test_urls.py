from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from shared.urls import redact, redis_connection_url


def settings(url: str | None, password: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(redis_url=url, redis_password=SecretStr(password) if password else None)


@pytest.mark.parametrize(
    ("url", "password", "want"),
    [
        (None, None, "redis://127.0.0.1:6379/0"),
        ("redis://cache:6379/2", "p@ss/word", "redis://:p%40ss%2Fword@cache:6379/2"),
        ("redis://app@cache:6379/0", "pw", "redis://app:pw@cache:6379/0"),
        ("redis://[::1]:6380/0", "pw", "redis://:pw@[::1]:6380/0"),
        ("rediss://:inurl@cache:6379/0", "ignored", "rediss://:inurl@cache:6379/0"),
    ],
)
def test_the_password_setting_is_added_to_the_url_keeping_user_and_host(
    url: str | None, password: str | None, want: str
) -> None:
    assert redis_connection_url(settings(url, password)) == want


@pytest.mark.parametrize(
    "text",
    [
        "Error connecting to redis://:hunter2@cache:6379/0",
        "redis://app:hunter2@cache:6379/0 refused",
        "redis://app:hunt/er2@cache:6379/0",
        "rediss://cache:6379/0?password=hunter2&ssl=1",
    ],
)
def test_redact_hides_passwords(text: str) -> None:
    assert "hunter2" not in redact(text) and "hunt/er2" not in redact(text)
    assert "***" in redact(text)


@pytest.mark.parametrize(
    ("url", "username", "password", "want"),
    [
        ("redis://cache:6379/0", "client", "p@ss", "redis://client:p%40ss@cache:6379/0"),
        ("redis://cache:6379/0", "us er", None, "redis://us%20er@cache:6379/0"),
        ("redis://app@cache:6379/0", "client", "pw", "redis://app:pw@cache:6379/0"),
        ("redis://:in%2Furl@cache:6379/0", "admin", None, "redis://admin:in%2Furl@cache:6379/0"),
        ("rediss://[::1]:6380/0", "worker", "pw", "rediss://worker:pw@[::1]:6380/0"),
        ("unix:///tmp/redis.sock", "worker", "pw", "unix:///tmp/redis.sock"),
    ],
)
def test_the_username_setting_is_added_where_the_url_names_no_user(
    url: str, username: str, password: str | None, want: str
) -> None:
    given = settings(url, password)
    given.redis_username = username
    assert redis_connection_url(given) == want
