"""Query strings and URL credentials never reach a log line, at any level."""

from __future__ import annotations

import logging

import pytest
import trio

import revdial
from conftest import wait_until
from revdial._redact import loggable_target, loggable_url
from test_frontdoor import USER, Cluster, cluster, tls

__all__ = ["cluster", "tls"]  # fixtures used here

SECRET = "s3cr3t-in-a-query-string"


def test_loggable_forms() -> None:
    assert loggable_target(b"/api/v1/pods?watch=1&token=x") == "/api/v1/pods?…"
    assert loggable_target("/version") == "/version"
    assert loggable_url("wss://user:pw@rd.example:8443/connect?token=x#f") == (
        "wss://rd.example:8443/connect?…")
    assert loggable_url("ws://[::1]:8123/connect") == "ws://[::1]:8123/connect"
    assert loggable_url("ws://rd.example/connect") == "ws://rd.example/connect"
    assert "x" not in loggable_url("not a url?token=x")


async def test_front_door_and_proxy_logs_show_no_query(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="revdial")
    with trio.fail_after(10):
        resp = await cluster.get(f"/k8s/clusters/c1/version?token={SECRET}", USER)
    assert resp.status == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/version?…" in logged  # the request was logged (at debug), its query was not
    assert SECRET not in logged
    assert USER not in logged


async def test_agent_logs_show_no_query_or_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="revdial")
    agent = revdial.Agent(f"ws://user:{SECRET}@127.0.0.1:1/connect?token={SECRET}")

    def failures() -> int:
        return sum("tunnel to" in r.getMessage() for r in caplog.records)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        with trio.fail_after(10):  # port 1 refuses at once; two attempts
            await wait_until(lambda: failures() >= 2)
        nursery.cancel_scope.cancel()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "tunnel to ws://127.0.0.1:1/connect?…" in logged
    assert SECRET not in logged
