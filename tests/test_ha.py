"""High availability with real processes: three peered ``revdial server`` replicas.

Three servers started from the command line, peered with ``--peer`` on
loopback, each with a ``--forward`` to every agent; three agents, each given
all three ``--server`` URLs and starting on a different replica. Every
server must reach every agent (directly or through a peer). Then one server
is killed (SIGKILL, by PID): its agent fails over to the next replica, every
surviving server reaches every agent again, and the survivors' metrics show
nothing left over (no streams, the dead peer's announcements forgotten).
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import TOKEN, echo_handler, serve_target
from test_cli import free_ports, http_get, revdial_process, run_revdial, wait_echo

PEER_TOKEN = "peer-tok-3f7a-not-in-logs"
N = 3


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def readyz_status(port: int) -> int:
    """The status of GET /readyz (0: no answer). Closes every response: a 503
    arrives as an HTTPError holding its socket."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except OSError:
        return 0


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return metric_values(await http_get(port, "/metrics"))


async def test_three_peered_servers_survive_one_killed(tmp_path: Path) -> None:
    ports = free_ports(2 * N + N * N)
    listen, metrics = ports[:N], ports[N:2 * N]
    forward = [ports[2 * N + i * N: 2 * N + (i + 1) * N] for i in range(N)]  # [server][agent]
    urls = [f"ws://127.0.0.1:{p}/connect" for p in listen]
    env = {"REVDIAL_PEER_TOKEN": PEER_TOKEN, "REVDIAL_TOKEN": TOKEN}
    async with serve_target(echo_handler) as echo, AsyncExitStack() as stack:
        servers = []
        for i in range(N):
            args = ["--log-level", "debug", "server", "--listen", f"127.0.0.1:{listen[i]}",
                    "--metrics-listen", f"127.0.0.1:{metrics[i]}", "--peer-id", f"s{i}"]
            args += [a for j in range(N) if j != i for a in ("--peer", f"s{j}={urls[j]}")]
            args += [a for j in range(N) for a in
                     ("--forward", f"127.0.0.1:{forward[i][j]}=a{j}/127.0.0.1:{echo}")]
            servers.append(await stack.enter_async_context(
                revdial_process(args, tmp_path / f"server{i}.log", env)))

        with trio.fail_after(20):  # every replica up before the agents start
            for port in metrics:
                while await trio.to_thread.run_sync(readyz_status, port) != 200:  # noqa: ASYNC110
                    await trio.sleep(0.05)  # polling another process's state
        agents = []
        for j in range(N):
            # Agent j starts on server j, then fails over in order.
            order = [urls[(j + k) % N] for k in range(N)]
            args = ["--log-level", "debug", "agent", "--id", f"a{j}",
                    "--allow", f"127.0.0.1:{echo}"]
            args += [a for u in order for a in ("--server", u)]
            agents.append(await stack.enter_async_context(
                revdial_process(args, tmp_path / f"agent{j}.log", {"REVDIAL_TOKEN": TOKEN})))

        def logs() -> str:
            return "\n".join(f"--- {p.log.name}:\n{p.output()}" for p in servers + agents)

        try:
            with trio.fail_after(30):
                for i in range(N):
                    for j in range(N):
                        await wait_echo(forward[i][j])  # server i reaches agent j
        except trio.TooSlowError:
            raise AssertionError(f"not every server reached every agent\n{logs()}") from None
        for i in range(N):
            assert "session" in servers[i].output()
            values = await scrape(metrics[i])
            assert values[("revdial_peers", ())] == N - 1
            assert values[("revdial_peer_links", (("direction", "out"),))] == N - 1
            assert values[("revdial_peer_links", (("direction", "in"),))] == N - 1
            # Each agent is here or announced by the peer that holds it.
            assert values[("revdial_sessions", ())] == 1
            assert values[("revdial_peer_announced_clients", ())] == N - 1
            assert values[("revdial_dials_total", (("result", "ok"),))] >= N

        status = await run_revdial("status", "--server", f"http://127.0.0.1:{metrics[0]}")
        assert status.returncode == 0, status.stderr
        text = status.stdout.decode()
        assert f"peer s1 at {urls[1]}: link up" in text
        assert "peer s2 from 127.0.0.1:" in text
        assert "announces 1 clients (a2)" in text

        servers[0].process.send_signal(signal.SIGKILL)  # by PID, no goodbye
        with trio.fail_after(10):
            await servers[0].process.wait()
        try:
            with trio.fail_after(30):
                # Agent a0 fails over to server 1; everyone reaches everyone again.
                for i in range(1, N):
                    for j in range(N):
                        await wait_echo(forward[i][j])
        except trio.TooSlowError:
            raise AssertionError(f"dials did not recover\n{logs()}") from None

        async def settled() -> bool:
            for i in range(1, N):
                values = await scrape(metrics[i])
                held = values[("revdial_sessions", ())]
                heard = values[("revdial_peer_announced_clients", ())]
                if (values[("revdial_streams", ())] != 0
                        or values[("revdial_peer_links", (("direction", "in"),))] != N - 2
                        or held + heard != N):
                    return False
            return True

        # server1 now holds a0 and a1 and hears of a2 from server2, which holds
        # a2 and hears of a0 and a1; s0's announcements are gone, no stream is left.
        with trio.fail_after(20):
            while not await settled():  # noqa: ASYNC110
                await trio.sleep(0.1)  # polling other processes' state
        s1 = await scrape(metrics[1])
        assert s1[("revdial_sessions", ())] == 2
        assert f"connected to {urls[1]}" in agents[0].output()  # a0 failed over to server 1
        for proc in servers[1:] + agents:
            assert proc.process.returncode is None  # nobody else died
        for i in range(1, N):
            assert await servers[i].terminate() == 0
        for proc in servers + agents:
            assert PEER_TOKEN not in proc.output()
            assert TOKEN not in proc.output()


async def test_peers_dns_from_the_command_line(tmp_path: Path) -> None:
    """``--peers-dns``: the name is resolved at start-up (the system resolver),
    this replica's own address is skipped, and /readyz waits for the answer."""
    listen, metrics = free_ports(2)
    args = ["--log-level", "debug", "server", "--listen", f"127.0.0.1:{listen}",
            "--metrics-listen", f"127.0.0.1:{metrics}", "--peer-id", f"127.0.0.1:{listen}",
            "--peers-dns", f"localhost:{listen}", "--peers-dns-interval", "1"]
    env = {"REVDIAL_PEER_TOKEN": PEER_TOKEN, "REVDIAL_TOKEN": TOKEN}
    async with revdial_process(args, tmp_path / "server.log", env) as server:
        with trio.fail_after(20):
            while await trio.to_thread.run_sync(readyz_status, metrics) != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)  # polling another process's state
        out = server.output()
        assert "peer discovery: localhost resolved to" in out
        assert f"127.0.0.1:{listen} found in" not in out  # itself: skipped
        assert await server.terminate() == 0
    assert PEER_TOKEN not in server.output()
