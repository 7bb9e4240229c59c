"""testkit/netns.py: the namespaces really are separate hosts, `hide` really hides, `cut` really is a
cable pull, and nothing outlives the `with` block.

Checked against a real redis-server in host "a" and real TCP connections from the other hosts,
because that is what the multi-host queue tests will do with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from depthq.config import ConfigError
from depthq.redis_server import find_server_binary
from testkit import netns
from testkit.netns import Network, unavailable_reason
from testkit.waiting import wait_for

# CI sets it, so that a machine that cannot build namespaces fails the run instead of skipping.
REQUIRE_TOOLS = os.environ.get("TEST_REQUIRE_TOOLS") == "1"
REDIS_PORT = 6379  # each host has its own port space: nothing else listens on 6379 in "a"
PONG = "+PONG\r\n"

# Runs inside a host: connect to each target, send one inline command, print what came back or the
# errno that stopped it ("timeout" when packets just vanish). `wait` retries a refused connect, for a
# server still starting.
PROBE = r"""
import errno, json, socket, sys, time
timeout, wait, payload = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode() + b"\r\n"
results = {}
for target in sys.argv[4:]:
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
                conn.sendall(payload)
                results[target] = conn.recv(65536).decode()
        except TimeoutError:
            results[target] = "timeout"
        except OSError as exc:
            results[target] = errno.errorcode.get(exc.errno, repr(exc))
        if results[target] != "ECONNREFUSED" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
print(json.dumps(results))
"""


def probe(
    net: Network, host: str, targets: list[str], payload: str = "PING", timeout: float = 5.0, wait: float = 0.0
) -> dict[str, str]:
    argv = [sys.executable, "-c", PROBE, str(timeout), str(wait), payload, *targets]
    return json.loads(net.run(host, argv).stdout)


@pytest.fixture(scope="module")
def available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{reason}, and TEST_REQUIRE_TOOLS=1 asks for every check")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lan(available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Hosts a, b, c; a real redis-server on a, listening on a's address and a's own loopback."""
    try:
        binary = find_server_binary(None)
    except ConfigError as exc:
        if REQUIRE_TOOLS:
            pytest.fail(f"{exc}, and TEST_REQUIRE_TOOLS=1 asks for every check")
        pytest.skip(str(exc))
    data = tmp_path_factory.mktemp("netns-redis")
    with Network(["a", "b", "c"]) as net, (data / "redis.log").open("wb") as log:
        argv = [binary, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", net.address("a")]
        argv += ["--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(data)]
        net.popen("a", argv, stdout=log, stderr=subprocess.STDOUT)
        ready = probe(net, "a", [f"127.0.0.1:{REDIS_PORT}"], wait=20)
        assert ready == {f"127.0.0.1:{REDIS_PORT}": PONG}, (data / "redis.log").read_text()
        yield net


@pytest.fixture
def root_listener() -> Iterator[int]:
    """A TCP port listening on every address of the root namespace: what b must not reach."""
    with socket.create_server(("", 0)) as server:
        yield server.getsockname()[1]


def root_addresses() -> list[str]:
    """The machine's own global addresses, IPv4 and IPv6, as "host:" prefixes."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = []
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            if addr.get("scope") == "global":
                found.append(f"[{addr['local']}]" if addr["family"] == "inet6" else addr["local"])
    return found


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent (or an init) that has not reaped it yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


# ------------------------------------------------------------------------------------ topology


def test_addresses_follow_the_host_order(lan: Network) -> None:
    prefix = lan.subnet.removesuffix("0/24")
    assert [lan.address(h) for h in ("a", "b", "c")] == [prefix + "1", prefix + "2", prefix + "3"]
    assert lan.interface("a") == "br0" and lan.interface("b") == lan.interface("c") == "eth0"
    for host in ("a", "b", "c"):
        shown = json.loads(lan.run(host, ["ip", "-4", "-j", "addr", "show", "dev", lan.interface(host)]).stdout)
        assert [a["local"] for a in shown[0]["addr_info"]] == [lan.address(host)]
        assert lan.ns(host).startswith(f"dq{os.getpid()}x") and lan.ns(host).endswith(f"-{host}")


def test_each_host_has_its_own_name(lan: Network) -> None:
    names = {host: lan.run(host, ["hostname"]).stdout.strip() for host in ("a", "b", "c")}
    assert names == {"a": "a", "b": "b", "c": "c"}
    assert socket.gethostname() not in names.values()  # the machine's own name is untouched


def test_b_and_c_reach_redis_on_a(lan: Network) -> None:
    target = f"{lan.address('a')}:{REDIS_PORT}"
    assert probe(lan, "b", [target], "INCR netns-hits") == {target: ":1\r\n"}
    assert probe(lan, "c", [target], "INCR netns-hits") == {target: ":2\r\n"}
    # Both increments landed in the one server, which a reaches over its own loopback.
    local = f"127.0.0.1:{REDIS_PORT}"
    assert probe(lan, "a", [local], "GET netns-hits") == {local: "$1\r\n2\r\n"}


def test_b_reaches_a_and_nothing_else(lan: Network, root_listener: int) -> None:
    port = root_listener
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the listener is really there for the root namespace
    expected = {
        f"{lan.address('a')}:{REDIS_PORT}": PONG,
        # b's loopback is b's own: neither the root's listener nor a's Redis is on it.
        f"127.0.0.1:{port}": "ECONNREFUSED",
        f"127.0.0.1:{REDIS_PORT}": "ECONNREFUSED",
        # No default route: the machine's own addresses and the outside world are not even routable.
        f"192.0.2.1:{port}": "ENETUNREACH",
        f"8.8.8.8:{port}": "ENETUNREACH",
        **{f"{addr}:{port}": "ENETUNREACH" for addr in root_addresses()},
    }
    assert probe(lan, "b", list(expected), timeout=2) == expected
    routes = json.loads(lan.run("b", ["ip", "-4", "-j", "route", "show", "table", "main"]).stdout)
    assert [r["dst"] for r in routes] == [lan.subnet]


# ------------------------------------------------------------------------------------ hide


CHILD = r"""
import errno, json, os, subprocess, sys
folder = sys.argv[1]
try:
    open(os.path.join(folder, "written"), "w").close()
    write = "ok"
except OSError as exc:
    write = errno.errorcode[exc.errno]
print(json.dumps({
    "pid": os.getpid(),
    "cwd": os.getcwd(),
    "mark": os.environ.get("DQ_NETNS_MARK"),
    "listing": os.listdir(folder),
    "child_listing": subprocess.run(["ls", "-A", folder], capture_output=True, text=True).stdout,
    "write": write,
}))
"""


def test_hide_empties_folders_for_that_process_only(lan: Network, tmp_path: Path) -> None:
    inbox, out = tmp_path / "a's inbox", tmp_path / "out $HOME"  # quoting is the harness's job
    inbox.mkdir()
    out.mkdir()
    (inbox / "photo.jpg").write_bytes(b"jpeg")
    env = {**os.environ, "DQ_NETNS_MARK": "two words"}
    process = lan.popen(
        "b",
        [sys.executable, "-c", CHILD, str(inbox)],
        hide=[inbox, out],
        env=env,
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    seen = json.loads(stdout)
    assert seen["pid"] == process.pid  # every wrapper exec'd: the Popen is the program
    assert seen["listing"] == [] and seen["child_listing"] == ""
    assert seen["write"] == "EROFS"
    # cwd and env pass through: the cwd is a hidden folder itself, entered before the tmpfs covered it.
    assert (seen["cwd"], seen["mark"]) == (str(out), "two words")
    # Outside that process nothing changed: not for the test, and not for another process in b.
    assert os.listdir(inbox) == ["photo.jpg"] and not os.path.ismount(inbox)
    assert lan.run("b", ["ls", "-A", str(inbox)]).stdout.split() == ["photo.jpg"]


def test_signals_reach_the_program_behind_the_wrappers(lan: Network, tmp_path: Path) -> None:
    process = lan.popen("b", ["sleep", "60"], hide=[tmp_path])
    # ip, unshare, sh, then sleep, all under the one pid: the Popen's.
    comm = Path(f"/proc/{process.pid}/comm")
    wait_for(lambda: comm.read_text().strip() == "sleep", "the wrappers to exec sleep", timeout=10)
    assert process.pid in lan.pids("b")
    process.terminate()
    assert process.wait(timeout=10) == -signal.SIGTERM
    assert lan.pids("b") == []


def test_hide_refuses_a_missing_folder(lan: Network, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="missing"):
        lan.popen("b", ["true"], hide=[tmp_path / "missing"])


# ------------------------------------------------------------------------------------ cut


HOLD = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
conn.sendall(b"CLIENT SETNAME netns-held\r\n")
assert conn.recv(64) == b"+OK\r\n"
print("connected", flush=True)
for line in sys.stdin:  # "ping S" or "read S": (send PING and) report what comes back within S seconds
    command, seconds = line.split()
    conn.settimeout(float(seconds))
    if command == "ping":
        conn.sendall(b"PING\r\n")
    try:
        print(repr(conn.recv(64)), flush=True)
    except TimeoutError:
        print("timeout", flush=True)
"""


def test_cut_is_a_cable_pull_and_restore_plugs_it_back(lan: Network) -> None:
    target = f"{lan.address('a')}:{REDIS_PORT}"
    held = lan.popen(
        "b", [sys.executable, "-c", HOLD, lan.address("a"), str(REDIS_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert held.stdin is not None and held.stdout is not None
    try:
        assert held.stdout.readline() == "connected\n"
        lan.cut("b")
        try:
            # New connections neither get refused nor "unreachable": the SYNs just vanish.
            assert probe(lan, "b", [target], timeout=0.5) == {target: "timeout"}
            assert probe(lan, "c", [target]) == {target: PONG}
            eth0 = json.loads(lan.run("b", ["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]
            assert "NO-CARRIER" in eth0["flags"] and "UP" in eth0["flags"]
            # The open connection: b's PING goes unanswered, and a never heard of a close.
            held.stdin.write("ping 0.3\n")
            held.stdin.flush()
            assert held.stdout.readline() == "timeout\n"
            clients = probe(lan, "a", [f"127.0.0.1:{REDIS_PORT}"], "CLIENT LIST")
            assert "name=netns-held" in clients[f"127.0.0.1:{REDIS_PORT}"]
        finally:
            lan.restore("b")
        # Plugged back in, TCP's retransmission delivers that PING, and its answer comes back.
        held.stdin.write("read 20\n")
        held.stdin.flush()
        assert held.stdout.readline() == repr(PONG.encode()) + "\n"
        assert probe(lan, "b", [target]) == {target: PONG}
    finally:
        held.kill()
        held.wait()


def test_cutting_the_first_host_cuts_everyone(lan: Network) -> None:
    target = f"{lan.address('a')}:{REDIS_PORT}"
    lan.cut("a")
    try:
        assert probe(lan, "b", [target], timeout=0.3) == probe(lan, "c", [target], timeout=0.3) == {target: "timeout"}
    finally:
        lan.restore("a")
    assert probe(lan, "b", [target]) == probe(lan, "c", [target]) == {target: PONG}


# ------------------------------------------------------------------------------------ cleanup


@pytest.mark.parametrize("leave", ["normally", "by an exception"])
def test_nothing_survives_the_with_block(available: None, tmp_path: Path, leave: str) -> None:
    with (
        pytest.raises(RuntimeError) if leave == "by an exception" else contextlib.nullcontext(),
        Network(["a", "b"]) as net,
    ):
        names = [net.ns("a"), net.ns("b")]
        started = net.popen("b", ["sleep", "60"], hide=[tmp_path])
        # A daemon nobody holds a Popen for: only `ip netns pids` can find it.
        orphan = int(net.run("a", ["sh", "-c", "sleep 61 </dev/null >/dev/null 2>&1 & echo $!"]).stdout)
        assert not is_dead(started.pid) and not is_dead(orphan)
        if leave == "by an exception":
            raise RuntimeError("the test failed mid-way")
    assert started.returncode == -signal.SIGKILL  # killed and reaped
    wait_for(lambda: is_dead(orphan), "the orphaned sleep to die", timeout=10)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names)
    with pytest.raises(netns.NetnsError, match="closed"):
        net.run("a", ["true"])


def test_leftovers_of_a_crashed_run_with_our_pid_are_replaced(available: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_counter", itertools.count(9999))
    stale = f"dq{os.getpid()}x9999-b"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    squatter = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        wait_for(lambda: netns._pids(stale) == [squatter.pid], "the squatter to enter", timeout=10)
        with Network(["a", "b"]) as net, Network(["a", "b"]) as other:
            assert net.ns("b") == stale and other.ns("b") != stale  # unique per instance
            assert net.pids("b") == [] and squatter.wait(timeout=10) == -signal.SIGKILL
            for host in ("a", "b"):
                assert probe(net, host, [f"{net.address('a')}:1"]) == {f"{net.address('a')}:1": "ECONNREFUSED"}
    finally:
        squatter.kill()
        squatter.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_a_single_host_is_a_bridge_alone(available: None) -> None:
    with Network(["solo"]) as net:
        assert net.address("solo") == net.subnet.removesuffix("0/24") + "1"
        target = f"{net.address('solo')}:1"
        assert probe(net, "solo", [target, "127.0.0.1:1"]) == {target: "ECONNREFUSED", "127.0.0.1:1": "ECONNREFUSED"}


def test_host_names_must_fit_interface_names() -> None:
    with pytest.raises(ValueError, match="15-character"):
        Network(["a", "thirteen-char"])
    with pytest.raises(ValueError, match="repeat"):
        Network(["a", "b", "a"])
    with pytest.raises(ValueError, match="no host 'z'"):
        Network(["a"]).ns("z")
