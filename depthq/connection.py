"""Which Redis to talk to, and a client that rides out short outages instead of crashing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from depthq.config import Config, ConfigError, RedisConfig, read_password_file

log = logging.getLogger(__name__)

# Written by `depthq up` next to the embedded server's data, so `depthq enqueue` finds it.
URL_FILE = "redis.url"


def redact(url: str) -> str:
    """A URL safe for logs: the password never reaches a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def embedded_url_file(config: Config) -> Path:
    return config.redis.data_dir / URL_FILE


def resolve_url(config: Config) -> str:
    """redis.url (or DEPTHQ_REDIS_URL), else the server a running `depthq up` started."""
    if config.redis.url:
        return config.redis.url
    marker = embedded_url_file(config)
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip()
    raise ConfigError(
        "redis.url: no Redis is configured and no `depthq up` is running here "
        f"(no {marker}); set redis.url in config.yaml or DEPTHQ_REDIS_URL=redis://host:6379/0, "
        "or start `depthq up`, which runs its own Redis"
    )


class RedisUnreachableError(ConfigError):
    """Redis did not answer at start. Unlike the other config errors this may pass by itself (a Redis
    restarting, a network coming up), so commands exit with EXIT_RETRY and service managers retry."""


class LoggedRetry(Retry):
    """redis-py's retry with back-off, saying so: an outage and the recovery each get one log line."""

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False) -> Any:
        failed: list[Exception] = []

        def note_failure(error: Exception, *count: int) -> Any:
            if not failed:
                log.warning("redis unavailable (%s); retrying with back-off", error)
            failed.append(error)
            return fail(error, *count)

        result = super().call_with_retry(do, note_failure, is_retryable, with_failure_count)
        if failed:
            log.warning("redis reachable again after %d failed attempt(s)", len(failed))
        return result


def _credentials(settings: RedisConfig) -> dict[str, str]:
    extra: dict[str, str] = {}
    if settings.username:
        extra["username"] = settings.username
    if settings.password_file is not None:
        extra["password"] = read_password_file(settings.password_file, "redis.password_file")
    if settings.ca_file is not None:
        if not settings.ca_file.is_file():
            raise ConfigError(f"redis.ca_file: {settings.ca_file} does not exist; point it at the CA's PEM file")
        extra["ssl_ca_certs"] = str(settings.ca_file)
    return extra


def url_with_credentials(url: str, settings: RedisConfig) -> str:
    """One URL carrying redis.username, redis.password_file and redis.ca_file, for tools that take
    only a URL (rq-dashboard). It holds the password: keep it in memory, never log it unredacted."""
    extra = _credentials(settings)
    parts = urlsplit(url)
    user = quote(extra.get("username", parts.username or ""), safe="")
    password = extra.get("password", parts.password)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    query = parse_qsl(parts.query)
    if "ssl_ca_certs" in extra:
        query.append(("ssl_ca_certs", extra["ssl_ca_certs"]))
    return urlunsplit((parts.scheme, auth + host, parts.path, urlencode(query), parts.fragment))


def connect(url: str, settings: RedisConfig | None = None) -> Redis:
    """A client that retries with jittered backoff, so a Redis restart is a pause, not a crash.

    Fails at once, naming the fix, if the server is unreachable or refuses the credentials.
    """
    extra = _credentials(settings) if settings is not None else {}
    if "ssl_ca_certs" in extra and not url.startswith("rediss://"):
        raise ConfigError(f"redis.ca_file is set but redis.url {redact(url)} is not rediss:// (TLS)")
    # One plain attempt first: redis-py counts refused credentials as a connection error, and the
    # retrying client below would back off on them for minutes instead of saying what is wrong.
    try:
        probe = Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=5, **extra)
    except ValueError as exc:  # a URL from DEPTHQ_REDIS_URL or the embedded server's marker file
        raise ConfigError(f"redis.url: {redact(url)} is not a usable Redis URL ({exc})") from None
    try:
        probe.ping()
    except AuthenticationError:
        raise ConfigError(
            f"redis: {redact(url)} refused the credentials; check the password in redis.url or "
            "redis.password_file (and redis.username for an ACL user)"
        ) from None
    except ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
            raise ConfigError(
                f"redis: {redact(url)} needs a password or an allowed ACL user ({exc}); set redis.password_file "
                "or put it in redis.url"
            ) from None
        if "DB index is out of range" in str(exc):
            raise ConfigError(
                f"redis.url: {redact(url)} names a database this server does not have ({exc}); "
                "use one from 0 to its `databases` setting minus 1 (0-15 by default)"
            ) from None
        raise
    except RedisConnectionError as exc:
        raise RedisUnreachableError(f"redis.url: cannot reach {redact(url)} ({exc}); is Redis running there?") from None
    finally:
        probe.close()
    # TCP keepalive notices a peer gone without a word; a unix socket has none (and refuses the option).
    tcp = {} if url.startswith("unix://") else {"socket_keepalive": True}
    client = Redis.from_url(
        url,
        retry=LoggedRetry(ExponentialWithJitterBackoff(base=0.2, cap=10.0), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        **tcp,
        **extra,
    )
    return client
