"""Credentials and reachability against real redis-servers: a password, an ACL user, a password file."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from depthq.config import ConfigError, RedisConfig
from depthq.connection import connect, redact
from depthq.redis_server import EmbeddedRedis, free_port
from tests.pki import make_pki, tls_server_binary

SECRET = "s3cret-pass"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("secured"),
        extra_args=("--requirepass", SECRET, "--user", "depthq", "on", ">worker-pass", "~*", "&*", "+@all"),
    )
    server.start()
    yield server
    server.stop()


def test_password_in_the_url(secured: EmbeddedRedis) -> None:
    client = connect(f"redis://:{SECRET}@127.0.0.1:{secured.port}/0")
    assert client.ping()


def test_password_from_a_file(secured: EmbeddedRedis, tmp_path: Path) -> None:
    secret_file = tmp_path / "redis.pass"
    secret_file.write_text(SECRET + "\n")
    client = connect(secured.url, RedisConfig(password_file=secret_file))
    assert client.set("k", "v") and client.get("k") == b"v"


def test_acl_user(secured: EmbeddedRedis, tmp_path: Path) -> None:
    secret_file = tmp_path / "worker.pass"
    secret_file.write_text("worker-pass")
    client = connect(secured.url, RedisConfig(username="depthq", password_file=secret_file))
    assert client.acl_whoami() == "depthq"


def test_missing_password_fails_at_start_naming_the_fix(secured: EmbeddedRedis) -> None:
    with pytest.raises(ConfigError, match="password_file"):
        connect(secured.url)


def test_wrong_password_fails_without_back_off_or_echoing_it(
    secured: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from depthq.connection import LoggedRetry

    backed_off: list[Exception] = []
    real = LoggedRetry.call_with_retry

    def spy(self, do, fail, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real(self, do, lambda error, *n: backed_off.append(error) or fail(error, *n), *args, **kwargs)

    monkeypatch.setattr(LoggedRetry, "call_with_retry", spy)
    with pytest.raises(ConfigError) as err:
        connect(f"redis://:not-the-password@127.0.0.1:{secured.port}/0")
    assert backed_off == []  # refused credentials are final: never retried with back-off
    assert "not-the-password" not in str(err.value) and "***" in str(err.value)


def test_unreachable_redis_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cannot reach redis://127\.0\.0\.1"):
        connect(f"redis://127.0.0.1:{free_port()}/0", RedisConfig())


def test_bad_password_file_and_ca_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.password_file"):
        connect("redis://127.0.0.1:1/0", RedisConfig(password_file=tmp_path / "nope"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        connect("redis://127.0.0.1:1/0", RedisConfig(password_file=tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"redis\.ca_file"):
        connect("rediss://127.0.0.1:1/0", RedisConfig(ca_file=tmp_path / "nope.pem"))
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="not rediss://"):
        connect("redis://127.0.0.1:1/0", RedisConfig(ca_file=tmp_path / "ca.pem"))


def test_urls_in_logs_never_carry_the_password(secured: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    assert redact(f"redis://user:{SECRET}@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact(f"rediss://:{SECRET}@host/0") == "rediss://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    caplog.set_level(logging.DEBUG)
    connect(f"redis://:{SECRET}@127.0.0.1:{secured.port}/0").ping()
    assert SECRET not in caplog.text


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedRedis, Path]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    binary = tls_server_binary()
    assert binary is not None  # make_pki skipped otherwise
    port = free_port()
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("tls-data"),
        server_bin=binary,
        port=free_port(),
        extra_args=(
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(pki / "server.pem"),
            "--tls-key-file",
            str(pki / "server.key"),
            "--tls-ca-cert-file",
            str(pki / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            SECRET,
        ),
    )
    server.start()
    yield server, pki / "ca.pem"
    server.stop()


def test_tls_with_the_ca_file(tls_server: tuple[EmbeddedRedis, Path], tmp_path: Path) -> None:
    server, ca = tls_server
    secret_file = tmp_path / "pass"
    secret_file.write_text(SECRET)
    tls_port = server.extra_args[server.extra_args.index("--tls-port") + 1]
    client = connect(f"rediss://127.0.0.1:{tls_port}/0", RedisConfig(ca_file=ca, password_file=secret_file))
    assert client.ping()
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def test_tls_without_trusting_the_ca_is_refused(tls_server: tuple[EmbeddedRedis, Path]) -> None:
    server, _ = tls_server
    tls_port = server.extra_args[server.extra_args.index("--tls-port") + 1]
    with pytest.raises(ConfigError, match=r"cannot reach rediss://.*(?i:certificate)"):
        connect(f"rediss://:{SECRET}@127.0.0.1:{tls_port}/0", RedisConfig())


def test_a_unix_socket_url(tmp_path: Path) -> None:
    """A Redis on the same machine reached through its socket file (redis.url: unix:///path)."""
    sock = tmp_path / "redis.sock"
    server = EmbeddedRedis(tmp_path / "data", extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700"))
    server.start()
    try:
        client = connect(f"unix://{sock}")
        assert client.ping() and client.connection_pool.connection_kwargs["path"] == str(sock)
        client.close()
    finally:
        server.stop()
