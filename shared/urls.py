"""Building the Redis URL from the settings, and hiding its secrets in anything shown."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_connection_url(settings: Any) -> str:
    """REDIS_URL (or the local default), with REDIS_USERNAME and REDIS_PASSWORD inserted where
    the URL has none (a Redis ACL user: docs/security.md). A Sentinel URL
    (``sentinel://HOST:26379;sentinel://HOST2:26379/0``) gets them in each of its parts: they
    are the master's credentials, as for Celery and kombu."""
    url: str = settings.redis_url or DEFAULT_REDIS_URL
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    username = getattr(settings, "redis_username", None)
    if url.startswith("sentinel://"):
        return ";".join(_with_credentials(part, username, password) for part in url.split(";"))
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return url
    return _with_credentials(url, username, password)


def _with_credentials(url: str, username: str | None, password: str | None) -> str:
    parts = urlsplit(url)
    add_user = bool(username) and not parts.username
    add_password = bool(password) and not parts.password
    if add_user or add_password:
        host = parts.netloc.rsplit("@", 1)[-1]  # keeps [IPv6] brackets and the port
        user = username if add_user else parts.username
        user = quote(user, safe="") if user else ""
        if add_password:
            secret = f":{quote(password or '', safe='')}"
        elif parts.password:
            secret = ":" + parts.netloc.rsplit("@", 1)[0].partition(":")[2]  # as written
        else:
            secret = ""
        url = urlunsplit(parts._replace(netloc=f"{user}{secret}@{host}"))
    return url


AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_connection_url(settings: Any) -> str:
    """The task broker: BROKER_URL, else the Redis of REDIS_URL (``redis_connection_url``)."""
    return getattr(settings, "broker_url", None) or redis_connection_url(settings)


def is_amqp(url: str) -> bool:
    """Whether a broker URL names RabbitMQ (AMQP 0-9-1) rather than Redis."""
    return url.partition("://")[0].lower() in AMQP_SCHEMES


def check_celery_environment(settings: Any, environ: Any) -> None:
    """Celery reads CELERY_BROKER_URL (and _READ_URL, _WRITE_URL) and CELERY_RESULT_BACKEND from
    the environment ahead of its configuration. Set to anything but what the settings name, the
    process would send or take tasks on one server while the registry and reload use another:
    raise ValueError naming both instead."""
    broker = broker_connection_url(settings)
    allowed = {broker, getattr(settings, "broker_url", None) or settings.redis_url or broker}
    for name in ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"):
        value = environ.get(name)
        if value and value not in allowed:
            source = "MODELWORKERS_BROKER_URL" if settings.broker_url else "MODELWORKERS_REDIS_URL"
            raise ValueError(
                f"{name}={redact(value)} names another broker than {source}={redact(broker)}: "
                f"unset {name} (Celery's own variable) and set MODELWORKERS_BROKER_URL for the "
                "task broker; results, the registry and reload stay on MODELWORKERS_REDIS_URL"
            )
    backend = environ.get("CELERY_RESULT_BACKEND")
    redis = redis_connection_url(settings)
    if backend and backend not in {redis, settings.redis_url or redis}:
        raise ValueError(
            f"CELERY_RESULT_BACKEND={redact(backend)} is not MODELWORKERS_REDIS_URL="
            f"{redact(redis)}: unset CELERY_RESULT_BACKEND (Celery's own variable); results, "
            "the registry and reload all live on MODELWORKERS_REDIS_URL"
        )


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels ``[(host, port)]`` of a ``sentinel://...;sentinel://...`` URL, and the
    master's connection arguments it carries (db, username, password: those of the first part
    that names them)."""
    hosts: list[tuple[str, int]] = []
    master: dict[str, Any] = {}
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"not a sentinel://HOST:PORT URL: {redact(part)!r}")
        hosts.append((parsed.hostname, parsed.port or 26379))
        if parsed.path.strip("/") and "db" not in master:
            master["db"] = int(parsed.path.strip("/"))
        if parsed.password and "password" not in master:
            master["password"] = unquote(parsed.password)
            if parsed.username:
                master["username"] = unquote(parsed.username)
    return hosts, master


_SECRET = re.compile(r"(?P<scheme>[a-z+]+://)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|pwd)=)[^&\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace passwords in URLs inside ``text`` (user:password@ and ?password=) with ``***``."""
    text = _SECRET.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)


def redis_client(settings: Any, **kwargs: Any) -> Any:
    """A redis-py client for the registry keys, with the same URL and TLS settings as Celery;
    with a ``sentinel://`` URL, one that connects to the master the sentinels name for
    REDIS_SENTINEL_MASTER (and finds the new one after a failover)."""
    import redis

    url = redis_connection_url(settings)
    options: dict[str, Any] = {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        **kwargs,
    }
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = settings.redis_tls_cert_reqs
        if settings.redis_tls_ca_certs:
            options["ssl_ca_certs"] = settings.redis_tls_ca_certs
    if is_sentinel(url):
        from redis.sentinel import Sentinel

        hosts, master = sentinel_parts(url)
        timeouts = {"socket_timeout": 5, "socket_connect_timeout": 5}
        sentinel = Sentinel(hosts, sentinel_kwargs=timeouts)
        name = getattr(settings, "redis_sentinel_master", "mymaster")
        return sentinel.master_for(name, **master, **options)
    return redis.Redis.from_url(url, **options)
