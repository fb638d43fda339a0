"""What one idle session holds: a heap view of N sessions on one side.

``--side server``: a library ``revdial.Server`` in this process (tracemalloc
on), the ``benchmarks.sessions agents`` helper as the N agents.
``--side agent``: N library agents in this process, ``revdial server`` (the
CLI) as the server. Prints, per session: the Python heap (tracemalloc
snapshot diff after a settle), grouped by the allocating line closest to
revdial / trio-websocket / wsproto / h11 / trio; the objects by type
(``gc.get_objects`` diff); and the live trio tasks. No RSS: that is
``benchmarks.sessions``.

    python -m benchmarks.sessionheap --side server --count 500
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tracemalloc
from collections import Counter
from typing import Any

from ._util import LOOPBACK, Proc, free_port, module_cmd, raise_nofile, revdial_cmd, wait_listening

TOKEN = "bench-token"
PACKAGES = ("revdial/", "trio_websocket/", "wsproto/", "h11/", "trio/", "outcome/")


def _where(tb: tracemalloc.Traceback) -> str:
    """The allocating frame closest to the allocation in a package we care about,
    with the first revdial frame above it (who asked)."""
    site = None
    owner = None
    for frame in reversed(tb):  # most recent call first
        name = frame.filename
        pkg = next((p for p in PACKAGES if p in name), None)
        if pkg is None:
            continue
        short = name[name.index(pkg):]
        if site is None:
            site = f"{short}:{frame.lineno}"
        if pkg == "revdial/" and owner is None:
            owner = f"{short}:{frame.lineno}"
            break
    if site is None:
        return "(other)"
    return site if owner in (None, site) else f"{site}  <- {owner}"


def _types() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _tasks() -> Counter[str]:
    import trio

    names: Counter[str] = Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        names[task.name.rpartition(".")[2]] += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return names


def _report(count: int, before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, *,
            types: tuple[Counter[str], Counter[str]],
            tasks: tuple[Counter[str], Counter[str]], top: int) -> None:
    types0, types1 = types
    tasks0, tasks1 = tasks
    by: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        by[_where(stat.traceback)] += stat.size_diff
    total = sum(by.values())
    print(f"python heap per session: {total / count / 1024:.2f} KiB "
          f"({count} sessions; tracemalloc diff)")
    for where, size in by.most_common(top):
        if size / count < 16:
            break
        print(f"  {size / count:7.0f} B  {where}")
    print("objects per session (gc, by type, >= 0.5):")
    diff = {k: (types1[k] - types0[k]) / count for k in types1 | types0}
    for name, n in sorted(diff.items(), key=lambda kv: -kv[1]):
        if n < 0.5:
            break
        print(f"  {n:6.2f}  {name}")
    print("trio tasks per session:")
    for name in tasks1 | tasks0:
        n = (tasks1[name] - tasks0[name]) / count
        if n:
            print(f"  {n:6.2f}  {name}")


async def _settle(seconds: float) -> None:
    import trio

    await trio.sleep(seconds)
    gc.collect()


def server_side(args: argparse.Namespace) -> None:
    import trio

    import revdial
    from revdial._server import token_authorizer

    logging.getLogger("revdial").setLevel(logging.WARNING)
    port = free_port()

    async def main() -> None:
        server = revdial.Server(token_authorizer(token=TOKEN))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, LOOPBACK, port)
            await _settle(0.5)
            types0, tasks0 = _types(), _tasks()
            before = tracemalloc.take_snapshot()
            helper = Proc(module_cmd(
                "benchmarks.sessions", "agents", "--url", f"ws://{LOOPBACK}:{port}/connect",
                "--count", str(args.count), "--allow", f"{LOOPBACK}:9"))
            try:
                with trio.fail_after(120):
                    while server.statistics().sessions < args.count:
                        helper.check_alive()
                        await trio.sleep(0.1)
                await _settle(args.settle)
                after = tracemalloc.take_snapshot()
                types1, tasks1 = _types(), _tasks()
                _report(args.count, before, after, types=(types0, types1), tasks=(tasks0, tasks1),
                        top=args.top)
            finally:
                helper.stop()
            nursery.cancel_scope.cancel()

    tracemalloc.start(args.frames)
    trio.run(main)


def agent_side(args: argparse.Namespace) -> None:
    import trio

    import revdial

    logging.getLogger("revdial").setLevel(logging.WARNING)
    port = free_port()
    server = Proc(revdial_cmd("server", "--listen", f"{LOOPBACK}:{port}", "--token", TOKEN))
    try:
        wait_listening(port)

        async def main() -> None:
            agents = [
                revdial.Agent(
                    f"ws://{LOOPBACK}:{port}/connect",
                    headers={"X-Tunnel-ID": f"fleet-{i}", "Authorization": f"Bearer {TOKEN}"},
                )
                for i in range(args.count)
            ]
            await _settle(0.5)
            types0, tasks0 = _types(), _tasks()
            before = tracemalloc.take_snapshot()
            async with trio.open_nursery() as nursery:
                for agent in agents:
                    nursery.start_soon(agent.run)
                with trio.fail_after(120):
                    while sum(1 for a in agents if a.session is not None) < args.count:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                await _settle(args.settle)
                after = tracemalloc.take_snapshot()
                types1, tasks1 = _types(), _tasks()
                _report(args.count, before, after, types=(types0, types1), tasks=(tasks0, tasks1),
                        top=args.top)
                nursery.cancel_scope.cancel()

        tracemalloc.start(args.frames)
        trio.run(main)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["server", "agent"], default="server")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--frames", type=int, default=25, help="tracemalloc traceback depth")
    parser.add_argument("--top", type=int, default=40)
    args: Any = parser.parse_args(argv)
    raise_nofile(2 * args.count + 200)
    (server_side if args.side == "server" else agent_side)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
