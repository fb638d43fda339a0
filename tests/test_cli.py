"""The ``revdial`` command, run as real subprocesses (``python -m revdial``).

The two-process tests start ``revdial server`` with ``--forward``s and
``revdial agent``, with target services running in the test, and talk to the
forwards over loopback. Processes are always killed on the way out; their
combined output goes to a file under ``tmp_path`` so no pipe can fill up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import trio
import trustme

import revdial
from conftest import (
    TOKEN,
    MiB,
    Targets,
    download_and_check,
    echo_handler,
    echo_roundtrip,
    pattern,
    read_until_reset,
    receive_exactly,
    serve_target,
    wait_until,
)
from revdial._standin import HTTPConnection

CLIENT = "c1"


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REVDIAL_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


@dataclass
class Proc:
    process: trio.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def terminate(self) -> int:
        """SIGTERM, then wait (at most 5 s) for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            return await self.process.wait()


@asynccontextmanager
async def revdial_process(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[Proc]:
    """Run ``python -m revdial ARGS``; kill it on exit if it is still running."""
    with _open_log(log) as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "revdial", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(env),
        )
        try:
            yield Proc(process, log)
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def run_revdial(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(20):
        return await trio.run_process(
            [sys.executable, "-m", "revdial", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env(),
        )


async def wait_echo(port: int) -> None:
    """Retry until an echo through the forward on ``port`` works.

    Until the agent's session is up the forward accepts and then closes the
    connection (no such client), or nothing listens yet: poll every 50 ms.
    """
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        async with stream:
            try:
                await stream.send_all(b"ready?")
                if await receive_exactly(stream, 6) == b"ready?":
                    return
            except (EOFError, trio.BrokenResourceError):
                pass
        await trio.sleep(0.05)


@dataclass
class Pair:
    server: Proc
    agent: Proc
    #: local forward port for each target port given to ``run_pair``.
    forwards: dict[int, int]


@asynccontextmanager
async def run_pair(
    tmp_path: Path,
    echo_port: int,
    *targets: int,
    scheme: str = "ws",
    server_extra: Sequence[str] = ("--token", TOKEN),
    agent_extra: Sequence[str] = ("--token", TOKEN),
    agent_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Pair]:
    """``revdial server`` forwarding to ``echo_port`` and ``targets`` through
    ``revdial agent`` (allowed exactly those); returns once an echo works.

    Both log at debug level, so "the token is never logged" is checked
    against everything they can say.
    """
    all_targets = [echo_port, *targets]
    listen, *local = free_ports(1 + len(all_targets))
    forwards = dict(zip(all_targets, local, strict=True))
    server_args = ["--log-level", "debug", "server", "--listen", f"127.0.0.1:{listen}",
                   *server_extra]
    agent_args = ["--log-level", "debug", "agent", "--server",
                  f"{scheme}://127.0.0.1:{listen}/connect", "--id", CLIENT, *agent_extra]
    for target, port in forwards.items():
        server_args += ["--forward", f"127.0.0.1:{port}={CLIENT}/127.0.0.1:{target}"]
        agent_args += ["--allow", f"127.0.0.1:{target}"]
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            revdial_process(server_args, tmp_path / "server.log")
        )
        agent = await stack.enter_async_context(
            revdial_process(agent_args, tmp_path / "agent.log", agent_env)
        )
        try:
            with trio.fail_after(20):
                await wait_echo(forwards[echo_port])
        except trio.TooSlowError:
            raise AssertionError(
                f"tunnel never came up\n--- server:\n{server.output()}\n"
                f"--- agent:\n{agent.output()}"
            ) from None
        yield Pair(server, agent, forwards)


# --- help and argument errors ----------------------------------------------------

HELP_MENTIONS = {
    (): ["server", "agent", "status", "demo", "--log-level", "--log-format"],
    ("server",): ["--listen", "--token", "--tokens", "--insecure-no-auth", "--forward",
                  "--tls-cert", "--tls-key", "--path", "--metrics-listen", "--metrics-clients",
                  "--peer-id", "--peer-token", "--peer-token-file", "--peer", "--peers-dns",
                  "--peers-dns-interval", "--peer-ca"],
    ("agent",): ["--server", "--id", "--token", "--allow", "--allow-all", "--ca-file",
                 "--ca-checksum"],
}


@pytest.mark.parametrize("command", list(HELP_MENTIONS), ids=["top", "server", "agent"])
async def test_help(command: tuple[str, ...]) -> None:
    result = await run_revdial(*command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    for option in HELP_MENTIONS[command]:
        assert option in text, f"{option} missing from 'revdial {' '.join(command)} --help'"


async def test_server_refuses_to_run_without_auth() -> None:
    (port,) = free_ports(1)
    result = await run_revdial("server", "--listen", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert b"--insecure-no-auth" in result.stderr


@pytest.mark.parametrize("case", ["no-auth", "address-in-use", "agent-bad-checksum"])
async def test_cli_errors_are_one_line(case: str, tmp_path: Path) -> None:
    if case == "agent-bad-checksum":
        ca_file = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca_file))
        result = await run_revdial("agent", "--server", "wss://127.0.0.1:1/connect", "--id",
                                   CLIENT, "--ca-file", str(ca_file), "--ca-checksum", "00" * 32)
        assert result.returncode == 1
        assert b"Traceback" not in result.stderr, result.stderr.decode()
        assert result.stderr.rstrip().endswith(b"pinned SHA-256 checksum")
        return
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if case == "no-auth":
            (free,) = free_ports(1)
            result = await run_revdial("server", "--listen", f"127.0.0.1:{free}")
        else:
            result = await run_revdial("server", "--listen", f"127.0.0.1:{port}",
                                       "--token", TOKEN)
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    assert result.stderr.startswith(b"revdial server: "), result.stderr.decode()


async def test_agent_refuses_wrong_ca_checksum(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    result = await run_revdial("agent", "--server", "wss://127.0.0.1:1/connect", "--id",
                               CLIENT, "--ca-file", str(ca_file), "--ca-checksum", "00" * 32)
    assert result.returncode != 0
    assert b"does not match the pinned SHA-256 checksum" in result.stderr


# --- a real server and agent -------------------------------------------------------


async def test_two_processes_forward(tmp_path: Path) -> None:
    async with serve_target(echo_handler) as echo, run_pair(tmp_path, echo) as pair:
        with trio.fail_after(30):
            port = pair.forwards[echo]
            async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                await echo_roundtrip(client, b"hello through two processes")
                # 10 MiB each way at once, checksummed.
                data = b"".join(pattern(20, 10 * MiB))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, data)
                    echoed = await receive_exactly(client, len(data))
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
            # A clean shutdown on SIGTERM, agent first, then the server.
            assert await pair.agent.terminate() == 0, pair.agent.output()
            assert await pair.server.terminate() == 0, pair.server.output()
        server_out, agent_out = pair.server.output(), pair.agent.output()
        assert "shutting down" in server_out
        assert "shutting down" in agent_out
        assert CLIENT in server_out  # it did log the session
        assert TOKEN not in server_out
        assert TOKEN not in agent_out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_through_forward(tmp_path: Path) -> None:
    body = b"hello from behind the agent\n" * 100

    async def http_responder(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = await stream.receive_some()
            if not data:
                return
            request += data
        path = request.split(b" ")[1]
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + b"X-Path: " + path + b"\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    async with (
        serve_target(echo_handler) as echo,
        serve_target(http_responder) as http,
        run_pair(tmp_path, echo, http) as pair,
    ):
        with trio.fail_after(20):
            result = await trio.run_process(
                ["curl", "-sS", "-D", "-", "--max-time", "10",
                 f"http://127.0.0.1:{pair.forwards[http]}/some/page"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        head, _, got = result.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"X-Path: /some/page" in head
        assert got == body


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
async def test_iperf3_through_forward(tmp_path: Path) -> None:
    (iperf_port,) = free_ports(1)
    iperf_server = await trio.lowlevel.open_process(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(iperf_port), "--forceflush"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert iperf_server.stdout is not None
        seen = b""
        with trio.fail_after(10):
            while b"Server listening" not in seen:
                chunk = await iperf_server.stdout.receive_some()
                assert chunk, f"iperf3 -s exited: {seen!r}"
                seen += chunk
        async with (
            serve_target(echo_handler) as echo,
            run_pair(tmp_path, echo, iperf_port) as pair,
        ):
            with trio.fail_after(30):
                result = await trio.run_process(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(pair.forwards[iperf_port]),
                     "-t", "2", "-J"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        report = json.loads(result.stdout)
        assert result.returncode == 0, report.get("error", result.stderr)
        assert report["end"]["sum_received"]["bytes"] > 0
        assert report["end"]["sum_sent"]["bytes"] > 0
    finally:
        if iperf_server.returncode is None:
            iperf_server.kill()
        with trio.CancelScope(shield=True):
            await iperf_server.wait()
            if iperf_server.stdout is not None:
                await iperf_server.stdout.aclose()


async def test_two_processes_tls_tokens_file_and_env_token(tmp_path: Path) -> None:
    """wss:// with --tls-cert/--tls-key and a pinned --ca-file; the server reads
    --tokens FILE and the agent takes its token from $REVDIAL_TOKEN."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    checksum = hashlib.sha256(ca_file.read_bytes()).hexdigest()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# key token\n\nsomeone-else other-token\n{CLIENT} {TOKEN}\n")
    async with (
        serve_target(echo_handler) as echo,
        run_pair(
            tmp_path,
            echo,
            scheme="wss",
            server_extra=["--tokens", str(tokens), "--tls-cert", str(cert_file),
                          "--tls-key", str(key_file)],
            agent_extra=["--ca-file", str(ca_file), "--ca-checksum", checksum],
            agent_env={"REVDIAL_TOKEN": TOKEN},
        ) as pair,
    ):
        with trio.fail_after(20):
            async with await trio.open_tcp_stream("127.0.0.1", pair.forwards[echo]) as client:
                await echo_roundtrip(client, b"over wss between two processes" * 1000)
            assert await pair.agent.terminate() == 0, pair.agent.output()
            assert await pair.server.terminate() == 0, pair.server.output()
        assert "wss://" in pair.agent.output()
        assert TOKEN not in pair.server.output()
        assert TOKEN not in pair.agent.output()


# --- failure semantics (issue #15): a broken tunnel resets, an orderly end closes ----


async def endless_source(stream: trio.SocketStream) -> None:
    """A download that never ends: any EOF its client sees is a lie."""
    chunk = next(pattern(7, 256 * 1024))
    while True:
        await stream.send_all(chunk)


@dataclass
class Sink:
    """A target that reads forever; records whether its connection was reset."""

    #: set once ``threshold`` bytes arrived
    started: trio.Event
    #: set when the connection ended (``reset`` says how)
    ended: trio.Event
    threshold: int = 1 * MiB
    received: int = 0
    reset: bool | None = None

    @classmethod
    def new(cls) -> Sink:
        return cls(trio.Event(), trio.Event())

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(256 * 1024):
                self.received += len(data)
                if self.received >= self.threshold:
                    self.started.set()
            self.reset = False  # a clean FIN: the upload looks complete
        except trio.BrokenResourceError as exc:
            self.reset = isinstance(exc.__cause__, ConnectionResetError)
        finally:
            self.ended.set()


async def send_forever(stream: trio.SocketStream) -> None:
    chunk = next(pattern(8, 256 * 1024))
    with contextlib.suppress(trio.BrokenResourceError):
        while True:
            await stream.send_all(chunk)


async def wait_log(proc: Proc, text: str) -> str:
    """Wait until ``text`` appears in the process's log (polled, bounded)."""
    await wait_until(lambda: text in proc.output())
    return proc.output()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_agent_killed_mid_download_resets_the_client(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with (
        serve_target(echo_handler) as echo,
        serve_target(endless_source) as source,
        run_pair(tmp_path, echo, source) as pair,
    ):
        with trio.fail_after(20):
            async with await trio.open_tcp_stream("127.0.0.1", pair.forwards[source]) as client:
                await receive_exactly(client, 1 * MiB)
                pair.agent.process.send_signal(signum)
                await read_until_reset(client)  # never EOF
            # (Only this forward's: the echo stream that proved the tunnel up may
            # still be closing when the agent dies, and be reset too.)
            mark = f"127.0.0.1:{source}: connection reset:"
            out = await wait_log(pair.server, mark)
        resets = [line for line in out.splitlines() if mark in line]
        assert len(resets) == 1, resets
        assert "WARNING" in resets[0]
        # Killed: the session is lost. Terminated: the agent may still get its
        # own resets of the streams out before it closes the session.
        causes = ["session lost"] + (["reset by peer"] if signum == signal.SIGTERM else [])
        assert any(cause in resets[0] for cause in causes), resets[0]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_server_killed_mid_upload_resets_the_target(
    tmp_path: Path, signum: signal.Signals
) -> None:
    sink = Sink.new()
    async with (
        serve_target(echo_handler) as echo,
        serve_target(sink) as target,
        run_pair(tmp_path, echo, target) as pair,
    ):
        with trio.fail_after(20):
            async with (
                await trio.open_tcp_stream("127.0.0.1", pair.forwards[target]) as client,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(send_forever, client)
                await sink.started.wait()
                pair.server.process.send_signal(signum)
                await sink.ended.wait()
            assert sink.reset is True, "the target saw a clean FIN: a truncated upload"
            out = await wait_log(pair.agent, f"connection to tcp/127.0.0.1:{target} reset")
        resets = [line for line in out.splitlines() if f"127.0.0.1:{target} reset" in line]
        assert len(resets) == 1, resets
        assert "WARNING" in resets[0]
        causes = ["session lost"] + (["reset by peer"] if signum == signal.SIGTERM else [])
        assert any(cause in resets[0] for cause in causes), resets[0]


async def test_stream_reset_by_the_far_end_resets_the_near_end(tmp_path: Path) -> None:
    """A target that resets mid-download resets the client; a client that
    resets mid-upload resets the target; a dial that fails after the client's
    early data resets the client -- through both processes."""
    sink = Sink.new()
    (closed,) = free_ports(1)  # allowed, nothing listens: connection refused

    async def resetting_source(stream: trio.SocketStream) -> None:
        for chunk in pattern(9, 2 * MiB):
            await stream.send_all(chunk)
        await revdial.abort(stream)

    async with (
        serve_target(echo_handler) as echo,
        serve_target(resetting_source) as source,
        serve_target(sink) as target,
        run_pair(tmp_path, echo, source, target, closed) as pair,
    ):
        with trio.fail_after(20):
            async with await trio.open_tcp_stream("127.0.0.1", pair.forwards[closed]) as client:
                await client.send_all(b"early data, before the dial is known to fail")
                assert await read_until_reset(client) == b""
            async with await trio.open_tcp_stream("127.0.0.1", pair.forwards[source]) as client:
                got = await read_until_reset(client)
                assert len(got) <= 2 * MiB
            client = await trio.open_tcp_stream("127.0.0.1", pair.forwards[target])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_forever, client)
                await sink.started.wait()
                nursery.cancel_scope.cancel()
            await revdial.abort(client)  # the uploading client resets
            await sink.ended.wait()
            assert sink.reset is True, "the target saw a clean FIN: a truncated upload"
            # Both processes are still up: only the streams were reset.
            async with await trio.open_tcp_stream("127.0.0.1", pair.forwards[echo]) as client:
                await echo_roundtrip(client, b"still here")
            # Logged with the cause (the socket is reset before the line is written).
            await wait_log(pair.server, f"127.0.0.1:{closed}: connection reset: dial")
            await wait_log(pair.server, f"127.0.0.1:{source}: connection reset: stream")


async def test_orderly_ends_close_cleanly_through_processes(
    tmp_path: Path, targets: Targets
) -> None:
    """A complete download ends in EOF with every byte; half-close still
    carries an upload whose end is the client's FIN."""
    async with run_pair(tmp_path, targets.echo, targets.download, targets.sha_eof) as pair:
        with trio.fail_after(20):
            async with await trio.open_tcp_stream(
                "127.0.0.1", pair.forwards[targets.download]
            ) as client:
                await download_and_check(client, 8 * MiB, seed=11)  # checksum, then EOF
            async with await trio.open_tcp_stream(
                "127.0.0.1", pair.forwards[targets.sha_eof]
            ) as client:
                data = b"".join(pattern(12, 4 * MiB))
                await client.send_all(data)
                await client.send_eof()
                assert await receive_exactly(client, 32) == hashlib.sha256(data).digest()
                assert await client.receive_some() == b""
        assert "connection reset:" not in pair.server.output()
        assert " reset: " not in pair.agent.output()


# --- observability: --metrics-listen, revdial status, --log-format json ----------------


async def poll_status(port: int, want: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``revdial status`` until its output contains ``want`` (bounded)."""
    with trio.fail_after(20):
        while True:
            result = await run_revdial("status", "--server", f"http://127.0.0.1:{port}")
            if result.returncode == 0 and want in result.stdout.decode():
                return result
            await trio.sleep(0.1)  # polling another process's state


def _json_lines(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        obj = json.loads(line)  # every line is one JSON object
        assert isinstance(obj, dict)
        assert {"time", "level", "logger", "message"} <= obj.keys()
        records.append(obj)
    return records


async def test_status_metrics_and_json_logs(tmp_path: Path) -> None:
    listen, metrics = free_ports(2)
    server_args = ["--log-level", "debug", "--log-format", "json", "server",
                   "--listen", f"127.0.0.1:{listen}", "--token", TOKEN,
                   "--metrics-listen", f"127.0.0.1:{metrics}"]
    agent_args = ["--log-level", "debug", "--log-format", "json", "agent",
                  "--server", f"ws://127.0.0.1:{listen}/connect?token={TOKEN}",
                  "--id", CLIENT, "--token", TOKEN]
    async with revdial_process(server_args, tmp_path / "server.log") as server:
        empty = await poll_status(metrics, "no clients connected")
        assert empty.stdout == b"no clients connected\n"
        async with revdial_process(agent_args, tmp_path / "agent.log") as agent:
            table = await poll_status(metrics, CLIENT)
            lines = table.stdout.decode().splitlines()
            assert lines[0].split()[:3] == ["CLIENT", "SESSION", "REMOTE"]
            row = lines[1].split()
            assert row[0] == CLIENT
            assert row[2].startswith("127.0.0.1:")
            assert row[-1] == "v1"

            as_json = await run_revdial("status", "--server", f"http://127.0.0.1:{metrics}/",
                                        "--json")
            assert as_json.returncode == 0, as_json.stderr
            (entry,) = json.loads(as_json.stdout)["clients"]
            assert entry["client_key"] == CLIENT
            assert entry["extension"] == 1

            body = await http_get(metrics, "/metrics")
            assert 'revdial_client_sessions{client="c1"} 1.0' in body
            assert await http_get(metrics, "/readyz") == "ready\n"
            assert await agent.terminate() == 0
        await poll_status(metrics, "no clients connected")
        assert await server.terminate() == 0
        server_out, agent_out = server.output(), agent.output()
    for out in (server_out, agent_out):
        assert TOKEN not in out
        assert "?token" not in out
    records = _json_lines(server_out)
    _json_lines(agent_out)
    start = next(r for r in records if r.get("event") == "session_start")
    end = next(r for r in records if r.get("event") == "session_end")
    assert start["client_key"] == end["client_key"] == CLIENT
    assert str(start["remote"]).startswith("127.0.0.1:")
    assert end["remote"] == start["remote"]
    assert isinstance(end["duration_s"], float)
    assert isinstance(end["bytes_in"], int)
    assert isinstance(end["bytes_out"], int)
    assert any("metrics and health on http://127.0.0.1:" in str(r["message"]) for r in records)


async def http_get(port: int, path: str) -> str:
    """GET with the standard library, in a thread (as ``revdial status`` does)."""
    import urllib.request

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            body: bytes = r.read()
            return body.decode()

    return await trio.to_thread.run_sync(get)


async def test_metrics_clients_must_be_a_count() -> None:
    (port,) = free_ports(1)
    result = await run_revdial("server", "--listen", f"127.0.0.1:{port}", "--token", TOKEN,
                               "--metrics-listen", "127.0.0.1:0", "--metrics-clients", "-1")
    assert result.returncode == 2
    assert b"--metrics-clients: must be >= 0" in result.stderr


async def test_status_unreachable_is_one_line_and_non_zero() -> None:
    (port,) = free_ports(1)
    result = await run_revdial("status", "--server", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith(f"revdial status: cannot reach http://127.0.0.1:{port}/clients: ")
    assert err.count("\n") == 1
    bad = await run_revdial("status", "--server", f"127.0.0.1:{port}")
    assert bad.returncode == 1
    assert b"--server must be http://" in bad.stderr


async def test_status_against_a_non_revdial_answer(tmp_path: Path) -> None:
    async def not_found(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")

    async with serve_target(not_found) as port:
        result = await run_revdial("status", "--server", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert b"answered 404" in result.stderr


async def test_sighup_rereads_user_tokens_without_dropping_sessions(tmp_path: Path) -> None:
    listen, http = free_ports(2)
    users = tmp_path / "users"
    users.write_text("first-user-token c1\n")
    server_args = ["server", "--listen", f"127.0.0.1:{listen}", "--token", TOKEN,
                   "--http-listen", f"127.0.0.1:{http}", "--user-tokens", str(users)]
    agent_args = ["agent", "--server", f"ws://127.0.0.1:{listen}/connect", "--id", CLIENT,
                  "--token", TOKEN]

    async def front_door_status(token: str) -> int:
        async with await HTTPConnection.open("127.0.0.1", http) as conn:
            resp = await conn.request("GET", f"/k8s/clusters/{CLIENT}/version",
                                      headers=[("Authorization", f"Bearer {token}")])
            return resp.status

    async with revdial_process(server_args, tmp_path / "server.log") as server, \
            revdial_process(agent_args, tmp_path / "agent.log") as agent:
        await wait_log(server, f"client '{CLIENT}' connected")
        # No --upstream on the agent: an authorized request reaches it and gets 502.
        assert await front_door_status("first-user-token") == 502
        users.write_text("second-user-token c1\n")
        server.process.send_signal(signal.SIGHUP)
        await wait_log(server, "received SIGHUP, re-reading")
        assert await front_door_status("first-user-token") == 401
        assert await front_door_status("second-user-token") == 502
        assert server.process.returncode is None  # SIGHUP did not end the server
        assert agent.output().count("connected to ws://") == 1  # nor its session
        assert await server.terminate() == 0
    logged = server.output()
    assert "first-user-token" not in logged
    assert "second-user-token" not in logged
