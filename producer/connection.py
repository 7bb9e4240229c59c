"""Which Redis to talk to, and a client that rides out short outages instead of crashing."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from producer.config import Config, ConfigError

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


def connect(url: str) -> Redis:
    """A client that retries with jittered backoff, so a Redis restart is a pause, not a crash."""
    return Redis.from_url(
        url,
        retry=Retry(ExponentialWithJitterBackoff(base=0.2, cap=10.0), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )
