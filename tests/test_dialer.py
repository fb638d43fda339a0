"""The agent's default dialer, against real loopback sockets."""

from __future__ import annotations

import errno
import functools
import socket

import pytest
import trio

from revdial._agent import AllowPolicy, _literal_family, default_dialer


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _echo_once(stream: trio.SocketStream) -> None:
    async with stream:
        data = await stream.receive_some()
        await stream.send_all(data)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", socket.AF_INET),
        ("::1", socket.AF_INET6),
        ("localhost", None),
        ("fe80::1%eth0", None),  # zoned: left to the resolver
        ("10.0.0.256", None),
    ],
)
def test_literal_family(host: str, expected: socket.AddressFamily | None) -> None:
    assert _literal_family(host) == expected


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
@pytest.mark.parametrize("proto", ["tcp", "tcp4", "tcp6"])
async def test_default_dialer_connects(host: str, proto: str) -> None:
    if host == "::1" and not _has_ipv6():
        pytest.skip("no IPv6 loopback")
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    mismatch = (proto == "tcp4" and family == socket.AF_INET6) or (
        proto == "tcp6" and family == socket.AF_INET
    )
    if mismatch and host != "localhost":
        pytest.skip("an address of the other family: the resolver decides")
    async with trio.open_nursery() as nursery:
        bind = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo_once, 0, host=bind))
        port = listeners[0].socket.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            stream = await default_dialer(proto, address)
        except OSError:
            if host == "localhost" and proto == "tcp6":
                nursery.cancel_scope.cancel()
                return  # localhost may not resolve to ::1 here
            raise
        async with stream:
            assert isinstance(stream, trio.SocketStream)
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"hi")
            assert await stream.receive_some() == b"hi"
        nursery.cancel_scope.cancel()


async def test_default_dialer_refused_port_raises_econnrefused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        with pytest.raises(ConnectionRefusedError) as info:
            await default_dialer("tcp", f"127.0.0.1:{port}")
    assert info.value.errno == errno.ECONNREFUSED


async def test_default_dialer_unknown_network() -> None:
    with pytest.raises(OSError, match="unknown network udp") as info:
        await default_dialer("udp", "127.0.0.1:53")
    assert info.value.errno == errno.EPROTONOSUPPORT


def test_allow_policy_ports_are_numbers() -> None:
    """Found by fuzz/fuzz_cli.py: ``--allow host:022`` never matched a dial to port 22."""
    policy = AllowPolicy(["db:022", "[::1]:8443", "*:443", "cache:*"])
    assert policy("tcp", "db:22")
    assert policy("tcp", "[::1]:8443")
    assert policy("tcp", "anything.example:443")
    assert policy("tcp", "cache:6379")
    assert not policy("tcp", "db:23")
    assert not policy("tcp", "localhost:22")  # hosts as written, no DNS
    assert not policy("udp", "db:22")
    for bad in ("db:0", "db:65536", "db:http", "db", ":22"):
        with pytest.raises(ValueError, match="allow pattern"):
            AllowPolicy([bad])
