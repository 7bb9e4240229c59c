"""Several "hosts" on one Linux machine, for multi-host tests: network namespaces joined by a bridge.

A multi-host test needs hosts that really are apart: a worker that reaches Redis over 127.0.0.1, or
reads the producer's inbox straight off the disk, passes on one machine and fails in production.
Network namespaces give each host its own loopback, addresses and routes for the price of a few `ip`
commands (no containers, no images), and `hide` gives a process its own view of the file system in
which the other host's folders are empty.

Topology: the first host ("a") holds a Linux bridge, `br0`, with its address on it, like a switch
built into the Redis host; every other host gets a veth pair, one end (`to-<host>`) a port of that
bridge, the other end (`eth0`) in the host's namespace. All addresses come from one private /24 that
no route of this machine covers, and no namespace has a default route: a process inside can reach
the test's hosts and nothing else.

Needs root and iproute2 (`ip`), util-linux (`unshare`) and `mount`; `unavailable_reason()` says in a
sentence why not, for a test to skip (or fail, where CI asks for every check).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["NetnsError", "Network", "unavailable_reason"]

BRIDGE = "br0"
HOST_INTERFACE = "eth0"
# The bridge port is named "to-<host>" inside the first host's namespace; interface names have at
# most 15 characters (IFNAMSIZ - 1), which leaves 12 for the host's name.
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,11}")
# Names are dq<pid>x<n>-<host>: unique per instance in this process, and per process on the machine.
_counter = itertools.count()
# Links settle in milliseconds; the deadline only bounds a failure on a very busy machine.
SETTLE_TIMEOUT_S = 10.0
# The candidate /24s, in order: 10.231.N.0/24 for the first N that no route of this machine touches.
_SUBNET_BASE = "10.231"


class NetnsError(RuntimeError):
    """Building, changing or tearing down the namespaces failed; the message carries `ip`'s own words."""


def _which(name: str) -> str | None:
    """`ip` and `mount` live in /usr/sbin and /sbin, which a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


@functools.cache
def _tool(name: str) -> str:
    """Absolute paths, so that a caller's `env` without /usr/sbin on PATH still finds them."""
    path = _which(name)
    if path is None:
        raise NetnsError(f"`{name}` is not installed")
    return path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_tool("ip"), *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"`ip {shlex.join(args)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def _namespaces() -> set[str]:
    return {entry["name"] for entry in json.loads(_ip("-j", "netns", "list").stdout or "[]")}


def _pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns`; none once it is gone (zombies have no namespace)."""
    result = _ip("netns", "pids", ns, check=False)
    return [int(word) for word in result.stdout.split()] if result.returncode == 0 else []


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 that overlaps none of this machine's routes, so that a test's addresses never mean
    something else too (and an "unreachable" check is not answered by a real neighbour)."""
    used = []
    for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        try:
            network = ipaddress.ip_network(route.get("dst", ""), strict=False)
        except ValueError:  # "default", or a route type ip prints without a destination
            continue
        if network.prefixlen > 0:
            used.append(network)
    for n in range(256):
        candidate = ipaddress.IPv4Network(f"{_SUBNET_BASE}.{n}.0/24")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NetnsError(f"every {_SUBNET_BASE}.N.0/24 overlaps a route of this machine")


@functools.cache
def unavailable_reason() -> str | None:
    """None where namespaces work here; else one sentence why not, for pytest.skip or pytest.fail.

    Checked by building a real two-host network and running a process with a hidden folder in it,
    because "root and `ip` installed" is not enough: a container without CAP_SYS_ADMIN, a kernel
    without veth or bridge support, or a read-only /run all fail only when tried. Cached: once a run.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    tools = (
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("sh", "dash"),
        ("hostname", "hostname"),
    )
    for name, package in tools:
        if _which(name) is None:
            return f"`{name}` is not installed (apt install {package})"
    try:
        with tempfile.TemporaryDirectory(prefix="dq-netns-probe-") as folder, Network(["a", "b"]) as net:
            (Path(folder) / "seen").touch()
            listing = net.run("b", ["ls", "-A", folder], hide=[folder]).stdout
            if listing.strip():
                return f"a tmpfs mounted over {folder} inside a namespace did not hide it ({listing.strip()!r})"
    except subprocess.CalledProcessError as exc:
        return f"network namespaces do not work here: {exc} ({(exc.stderr or '').strip()})"
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces do not work here: {exc}"
    return None


class Network:
    """Hosts as network namespaces on one bridge; a context manager that leaves nothing behind.

    `Network(["a", "b", "c"])`: "a" gets .1 on the bridge, "b" .2 and "c" .3 on their `eth0`, in a
    /24 of 10.231.0.0/16 that this machine does not route. Leaving the `with` block, even by an
    exception, SIGKILLs every process inside the namespaces (what `popen` started, and whatever those
    or `run` left behind), reaps the `popen` ones and deletes the namespaces, whose links go with them.
    """

    def __init__(self, hosts: Sequence[str]) -> None:
        if isinstance(hosts, str):
            raise TypeError(f"hosts is a list of names, not one string ({hosts!r})")
        hosts = list(hosts)
        if not hosts:
            raise ValueError("a network needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names repeat: {hosts}")
        if len(hosts) > 253:
            raise ValueError(f"{len(hosts)} hosts do not fit in a /24")
        for host in hosts:
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(
                    f"host name {host!r}: 1 to 12 letters, digits, '-' or '_' (its bridge port, 'to-{host}', "
                    "must fit the kernel's 15-character interface names)"
                )
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.prefix = f"dq{os.getpid()}x{next(_counter)}"
        self._ns = {host: f"{self.prefix}-{host}" for host in hosts}
        self._subnet: ipaddress.IPv4Network | None = None
        self._processes: list[subprocess.Popen[Any]] = []
        self._state = "new"

    # --------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Network:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Build the namespaces and links and return once every link forwards; on any failure, tear
        down what was built and raise."""
        if self._state != "new":
            raise NetnsError(f"network {self.prefix} was already started")
        self._state = "started"
        atexit.register(self.close)  # a forgotten close() must not outlive the test run
        try:
            self._remove(set(self._ns.values()) & _namespaces())  # a crashed run with our pid left them
            self._subnet = _free_subnet()
            self._build()
            self._settle(self.hosts[1:])
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        hub = self._ns[self.hosts[0]]
        for ns in self._ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # STP off and no forward delay: a port forwards the moment its link is up, here and after restore().
        _ip("-n", hub, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", hub, "addr", "add", self._cidr(self.hosts[0]), "dev", BRIDGE)
        _ip("-n", hub, "link", "set", BRIDGE, "up")
        for host in self.hosts[1:]:
            ns, port = self._ns[host], self._port(host)
            # Created in the hub with its peer straight in the host: no name ever exists in the root
            # namespace, so concurrent networks (all with a "to-b" and an "eth0") cannot collide.
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", ns)
            _ip("-n", hub, "link", "set", port, "master", BRIDGE)
            _ip("-n", hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", self._cidr(host), "dev", HOST_INTERFACE)
            _ip("-n", ns, "link", "set", HOST_INTERFACE, "up")

    def _settle(self, hosts: Sequence[str]) -> None:
        """Wait until each host's `eth0` and bridge port are up and the port forwards, and the bridge is
        up: polled, since carrier, operstate and port state follow `ip link set up` asynchronously, and
        until the kernel's link watcher has caught up (operstate UP) a link drops what it is given."""
        hub = self._ns[self.hosts[0]]
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            waiting = []
            for host in hosts:
                port = _link(hub, self._port(host))
                port_state = port.get("linkinfo", {}).get("info_slave_data", {}).get("state")
                eth = _link(self._ns[host], HOST_INTERFACE)
                if (port.get("operstate"), port_state, eth.get("operstate")) != ("UP", "forwarding", "UP"):
                    waiting.append(
                        f"{host}: port {self._port(host)} {port.get('operstate')}/{port_state}, "
                        f"{HOST_INTERFACE} {eth.get('operstate')}"
                    )
            # A bridge without ports has no carrier: only one with ports can be waited for.
            if len(self.hosts) > 1 and (bridge := _link(hub, BRIDGE).get("operstate")) != "UP":
                waiting.append(f"{BRIDGE} {bridge}")
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"links not up after {SETTLE_TIMEOUT_S}s: {'; '.join(waiting)}")
            time.sleep(0.005)

    def close(self) -> None:
        """Kill everything inside, reap what `popen` started, delete the namespaces. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        atexit.unregister(self.close)
        # Our own children first, directly: one may still be in `ip netns exec`, not yet inside.
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        errors = self._remove(set(self._ns.values()) & _namespaces(), raise_errors=False)
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {process.pid} did not exit after SIGKILL")
        if errors:
            raise NetnsError(f"network {self.prefix} left state behind: {'; '.join(errors)}")

    def _remove(self, namespaces: Iterable[str], raise_errors: bool = True) -> list[str]:
        """SIGKILL every process in the namespaces until none is left, then delete them.

        Killing first matters: `ip netns del` only drops the name, and a namespace with a process in
        it lives on, links, addresses and all, until that process exits.
        """
        errors: list[str] = []
        for ns in sorted(namespaces):
            deadline = time.monotonic() + 10
            while pids := _pids(ns):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                        os.kill(pid, signal.SIGKILL)
                for process in self._processes:
                    process.poll()  # reaped, a killed child of ours drops out of the listing
                if time.monotonic() > deadline:
                    errors.append(f"{ns}: pids {pids} survive SIGKILL")
                    break
                time.sleep(0.005)
            result = _ip("netns", "del", ns, check=False)
            if result.returncode != 0 and ns in _namespaces():
                errors.append(f"`ip netns del {ns}`: {result.stderr.strip()}")
        if errors and raise_errors:
            raise NetnsError("; ".join(errors))
        return errors

    # --------------------------------------------------------------------------------- looking up

    def ns(self, host: str) -> str:
        """The namespace's name, for `ip -n <ns> ...` and `ip netns exec <ns> ...`."""
        try:
            return self._ns[host]
        except KeyError:
            raise ValueError(f"no host {host!r} in this network (hosts: {', '.join(self.hosts)})") from None

    def interface(self, host: str) -> str:
        """The interface that carries the host's address: the bridge on the first host, `eth0` elsewhere."""
        self.ns(host)
        return BRIDGE if host == self.hosts[0] else HOST_INTERFACE

    def address(self, host: str) -> str:
        """The host's IPv4 address: .1 for the first host, then .2, .3, ... in the order given."""
        return str(self._require_subnet().network_address + 1 + self.hosts.index(self._known(host)))

    @property
    def subnet(self) -> str:
        """The network's /24, e.g. for a server's bind or an allow-list."""
        return str(self._require_subnet())

    def pids(self, host: str) -> list[int]:
        """Every process now inside the host's namespace (`ip netns pids`)."""
        return _pids(self.ns(host))

    def _known(self, host: str) -> str:
        self.ns(host)
        return host

    def _require_subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise NetnsError("the network is not started: use it as a context manager")
        return self._subnet

    def _cidr(self, host: str) -> str:
        return f"{self.address(host)}/{self._require_subnet().prefixlen}"

    def _port(self, host: str) -> str:
        return f"to-{host}"

    # --------------------------------------------------------------------------------- processes

    def command(
        self, host: str, argv: Sequence[str | os.PathLike[str]], hide: Iterable[str | os.PathLike[str]] = ()
    ) -> list[str]:
        """The argv that runs `argv` inside the host's namespace, under the host's name (a UTS
        namespace), each `hide` folder covered by an empty, read-only tmpfs in a mount namespace.

        Every step execs the next (`ip netns exec`, `unshare`, `sh -c '... && exec "$@"'`), so the
        process started is the program itself: its pid is the Popen's and signals reach it. The tmpfs
        is read-only so that a program that writes where it should not fails loudly (EROFS) instead
        of writing into a folder that vanishes with it. The mounts are private to that process and its
        children: the folders stay as they are for everyone else.
        """
        if self._state != "started":
            raise NetnsError(f"network {self.prefix} is {self._state}, not started")
        ns = self.ns(host)
        args = [os.fspath(arg) for arg in argv]
        if not args:
            raise ValueError("empty argv")
        prefix = [_tool("ip"), "netns", "exec", ns]
        folders = [_hideable(folder) for folder in hide]
        # Its own host name too (a UTS namespace): what the program reports as its host is `host`.
        steps = [f"{shlex.quote(_tool('hostname'))} {shlex.quote(host)}"]
        mount = _tool("mount") if folders else ""
        steps += [
            f"{shlex.quote(mount)} -t tmpfs -o ro,mode=0755 dq-hidden {shlex.quote(folder)}" for folder in folders
        ]
        script = " && ".join([*steps, 'exec "$@"'])
        isolate = ["--uts", *(["--mount", "--propagation", "private"] if folders else [])]
        return [*prefix, _tool("unshare"), *isolate, _tool("sh"), "-c", script, "sh", *args]

    def popen(
        self,
        host: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        hide: Iterable[str | os.PathLike[str]] = (),
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the host (all keyword arguments pass through: env, cwd, stdout, ...).

        Killed and reaped when the network closes, if still running. A program that does not exist
        shows as exit status 127 (with `hide`) or 255 (without), not as FileNotFoundError.
        """
        if kwargs.get("shell"):
            raise ValueError("shell=True is not supported: pass ['sh', '-c', script] as argv")
        process = subprocess.Popen(self.command(host, argv, hide), **kwargs)
        self._processes.append(process)
        return process

    def run(
        self,
        host: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        hide: Iterable[str | os.PathLike[str]] = (),
        check: bool = True,
        timeout: float | None = 60,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the host: checked, output captured as text unless told otherwise, and
        bounded by a timeout, so a test that hangs in a namespace fails instead."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(host, argv, hide), check=check, timeout=timeout, **kwargs)

    # --------------------------------------------------------------------------------- faults

    def cut(self, host: str) -> None:
        """Pull the host's cable: its bridge port in the first host goes down.

        The port, not the host's own `eth0`: downing `eth0` is an administrative shutdown that the host's
        kernel knows about, dropping its route, so its sockets fail at once with "Network is
        unreachable". Downing the port takes the carrier off `eth0` (NO-CARRIER, still administratively
        UP, route kept) exactly as an unplugged cable does: packets on both sides silently vanish, no
        FIN or RST is sent, connects time out, and established connections hang until TCP's own
        timeouts or keepalives notice, or resume if the cable comes back first.

        Cutting the first host takes down every port: it is the switch too, so the others also lose
        each other.
        """
        hub = self._ns[self.hosts[0]]
        for other in self._ported(host):
            _ip("-n", hub, "link", "set", self._port(other), "down")

    def restore(self, host: str) -> None:
        """Plug the cable back in, and return once the link forwards again.

        As after a real replug, a host whose ARP request went unanswered while cut asks again on its
        own schedule (net.ipv4.neigh.*.retrans_time, a second): its first packets may wait that long.
        """
        hub = self._ns[self.hosts[0]]
        ported = self._ported(host)
        for other in ported:
            _ip("-n", hub, "link", "set", self._port(other), "up")
        self._settle(ported)

    def _ported(self, host: str) -> list[str]:
        self.ns(host)
        if self._state != "started":
            raise NetnsError(f"network {self.prefix} is {self._state}, not started")
        return list(self.hosts[1:]) if host == self.hosts[0] else [host]


def _link(ns: str, device: str) -> dict[str, Any]:
    links = json.loads(_ip("-n", ns, "-j", "-d", "link", "show", "dev", device).stdout or "[]")
    return links[0] if links else {}


def _hideable(folder: str | os.PathLike[str]) -> str:
    """The folder's real path: mounting follows symlinks anyway, and a missing folder would otherwise
    fail inside the child, as an exit status, instead of here with its name."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise NotADirectoryError(f"cannot hide {folder}: not an existing folder")
    return str(path)
