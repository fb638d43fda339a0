"""Fuzz the command line's parsers: ``python -m fuzz.fuzz_cli --seconds N``.

Targets: ``HOST:PORT`` (``split_host_port``, ``--listen``), ``--forward``
specs, ``--allow`` patterns and the agent's ``AllowPolicy`` decisions, and the
token files (``--tokens``, ``--user-tokens``).

Invariants:

* each parser returns a well-formed value or raises its documented error
  (``ValueError``, or ``argparse.ArgumentTypeError`` for argparse types) --
  nothing else;
* what is accepted is consistent: ports in range, a parsed address formats
  back to one that parses to the same, a ``--forward`` keeps its parts;
* an ``AllowPolicy`` decision is a bool for any ``proto``/``address`` (never
  an exception: the agent asks it about what a server sends), allows exactly
  the ``HOST:PORT`` it was given, and ``*`` widens only its own field;
* errors about a token file name the file and line but never echo the line,
  which holds a secret; an identity read from a user-token file (``user=``,
  ``groups=``) always makes header values h11 accepts, so no file can inject
  a header into what the front door sends upstream.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

import h11
from hypothesis import given
from hypothesis import strategies as st

from fuzz import FuzzRun, fuzz_settings, main
from revdial._agent import AllowPolicy, split_host_port
from revdial._cli import parse_forward, read_tokens_file
from revdial._frontdoor import read_user_tokens, upstream_headers

_ALPHABET = st.sampled_from([*"0123456789abcxyz.-_:[]*/=,# \t", "::1", "127.0.0.1", "²",
                             "\u0661", "\x00", "é"])
texts = st.one_of(st.text(max_size=40), st.lists(_ALPHABET, max_size=20).map("".join))


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_address(text: str) -> None:
    for allow_zero in (False, True):
        try:
            host, port = split_host_port(text, allow_zero=allow_zero)
        except ValueError:
            continue
        assert host
        assert (0 if allow_zero else 1) <= port < 65536, (text, port)
        assert split_host_port(_format(host, port), allow_zero=allow_zero) == (host, port)


def check_forward(spec: str) -> None:
    try:
        fwd = parse_forward(spec)
    except argparse.ArgumentTypeError as exc:
        if not str(exc).startswith("--forward "):
            raise AssertionError(f"error does not name the option: {exc}") from exc
        return
    assert 1 <= fwd.listen_port < 65536
    assert fwd.client_key
    assert "/" not in fwd.client_key
    split_host_port(fwd.target)  # the target the agent will be asked to dial parses
    assert spec.endswith(fwd.client_key + "/" + fwd.target)
    str(fwd)


def check_policy(patterns: list[str], proto: str, address: str) -> None:
    try:
        policy = AllowPolicy(patterns)
    except ValueError:
        return
    repr(policy)
    decision = policy(proto, address)
    assert isinstance(decision, bool)
    for pattern in patterns:
        if pattern.startswith("unix:"):
            assert policy("unix", pattern[5:])
            continue
        host, _, port = pattern.rpartition(":")
        bare = host.strip("[]")
        if port.isdigit() and host != "*" and bare and 0 < int(port) < 65536:
            address_ok = _format(bare, int(port))
            try:
                split_host_port(address_ok)
            except ValueError:
                continue
            assert policy("tcp", address_ok), (pattern, address_ok)
            assert not AllowPolicy([])("tcp", address_ok)


def check_token_file(content: str) -> None:
    fd, path = tempfile.mkstemp(prefix="fuzz-tokens-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        for reader in (read_tokens_file, read_user_tokens):
            try:
                result = reader(path)
            except ValueError as exc:
                message = str(exc)
                assert message.startswith(path), message
                for line in content.splitlines():
                    secret = line.strip()
                    if len(secret) >= 8 and secret not in path:
                        assert secret not in message, "a token file line was echoed"
            except UnicodeDecodeError:
                pass  # not UTF-8: reported by the caller as an OSError-like failure
            else:
                for grant in getattr(result, "_grants", ()):
                    headers = upstream_headers([], b"up", grant.identity)
                    h11.Request(method="GET", target="/", headers=headers)  # valid or raises
    finally:
        os.unlink(path)


def build(run: FuzzRun) -> Callable[[], None]:
    @fuzz_settings(max_examples=400)
    @given(
        address=texts,
        spec=st.one_of(texts, st.builds(lambda a, k, t: f"{a}={k}/{t}", texts, texts, texts)),
        patterns=st.lists(texts, max_size=4),
        proto=st.sampled_from(["tcp", "tcp4", "tcp6", "unix", "udp", "", "TCP"]),
        lines=st.lists(st.one_of(
            texts,
            st.builds(lambda a, b: f"{a} {b}", texts, texts),
            st.builds(lambda a, b, u, g: f"{a} {b} user={u} groups={g}", texts, texts, texts,
                      texts),
            st.builds(lambda a, b, c: f"{a} {b} {c}", texts, texts, texts),
        ), max_size=4),
    )
    def test(address: str, spec: str, patterns: list[str], proto: str,
             lines: list[str]) -> None:
        def go() -> None:
            check_address(address)
            check_forward(spec)
            check_policy(patterns, proto, address)
            check_token_file("\n".join(lines))

        run.record(lambda: repr((address, spec, patterns, proto, lines)), go)

    return test


if __name__ == "__main__":
    sys.exit(main("fuzz_cli", build))
