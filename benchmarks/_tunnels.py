"""Every path under test, started the same way: "forward these loopback ports to
these targets". A workload runs identically through any of them.

Kinds:

* ``plain``: no tunnel, the forward port *is* the target port (kernel loopback).
* ``relay``: the bare trio TCP relay (``benchmarks.baselines relay``).
* ``wspipe``: the bare trio-websocket pipe, one WebSocket per connection
  (``benchmarks.baselines ws-server`` / ``ws-client``).
* ``revdial``: ``revdial server --forward`` + ``revdial agent``, the CLI as shipped.
* ``revdial-base``: the CLI of an older checkout (``$REVDIAL_BASE_SRC``), for A/B.
* ``revdial-tls``: ``revdial`` with the WebSocket under TLS (``--tls-cert`` /
  ``--tls-key`` on the server, ``wss://`` and ``--ca-file`` on the agent; a
  throw-away ``trustme`` CA), as a deployment without a TLS terminator in
  front of the server runs it.
* ``revdial-lib``: the same through the library (``benchmarks.revdial_forward``),
  for a frame size or ``extensions=False`` the CLI does not expose.
* ``ssh``: ``ssh -R`` through a private sshd on 127.0.0.1 (OpenSSH defaults; a
  pty session so that OpenSSH sets TCP_NODELAY, as for interactive use).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._util import LOOPBACK, KiB, Proc, free_port, module_cmd, revdial_cmd, wait_listening

SSHD = "/usr/sbin/sshd"
TOKEN = "bench-token"
KEY = "bench"

#: Human-readable description of each kind, for tables and the README.
DESCRIPTIONS = {
    "plain": "plain loopback (no tunnel)",
    "relay": "bare trio TCP relay, 256 KiB reads",
    "wspipe": "bare trio-websocket pipe, 1 WS per connection",
    "revdial": "revdial CLI (server --forward + agent)",
    "revdial-noext": "revdial, agent extensions=False (plain remotedialer)",
    "revdial-base": "revdial CLI of an older checkout ($REVDIAL_BASE_SRC)",
    "revdial-tls": "revdial CLI, WebSocket under TLS (wss://)",
    "revdial-tls-base": "revdial-tls with an older checkout ($REVDIAL_BASE_SRC)",
    "ssh": "OpenSSH ssh -R (private sshd)",
}


def base_env() -> dict[str, str]:
    """Environment that runs an older revdial: ``REVDIAL_BASE_SRC`` = its ``src`` dir.

    The ``revdial-base`` path is the CLI of that checkout (for example
    ``git worktree add /tmp/base HEAD~3``), so a change is measured against
    the code before it in one interleaved run.
    """
    src = os.environ.get("REVDIAL_BASE_SRC")
    if not src or not os.path.isdir(os.path.join(src, "revdial")):
        raise RuntimeError("revdial-base needs REVDIAL_BASE_SRC=<older checkout>/src")
    return {"PYTHONPATH": src}


def ssh_unavailable() -> str | None:
    """Why the ``ssh`` baseline cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} not found (apt-get install -y openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install -y openssh-client)"
    return None


@dataclass
class Tunnel:
    kind: str
    #: Loopback ports to connect to, one per requested target, in order.
    ports: list[int]
    #: Processes of the tunnel by role ("server", "agent", ...), for RSS/CPU sampling.
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.procs.items()}

    def check_alive(self) -> None:
        for p in self.procs.values():
            p.check_alive()


@contextlib.contextmanager
def open_tunnel(
    kind: str,
    targets: Sequence[int],
    *,
    msg_size: int = 256 * KiB,
    extensions: bool = True,
    ssh_cipher: str | None = None,
    limits: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    log_level: str = "warning",
) -> Iterator[Tunnel]:
    """Start ``kind`` forwarding a fresh loopback port to each target port."""
    if kind in ("revdial-base", "revdial-tls-base"):
        kind, env = kind.removesuffix("-base"), {**(env or {}), **base_env()}
    with contextlib.ExitStack() as stack:

        def start(role: str, cmd: Sequence[str]) -> Proc:
            proc = Proc(cmd, env)
            stack.callback(proc.stop)
            tunnel.procs[role] = proc
            return proc

        if kind == "plain":
            tunnel = Tunnel(kind, list(targets))
            yield tunnel
            return
        ports = [free_port() for _ in targets]
        tunnel = Tunnel(kind, ports)
        fwd = [f"{lp}={LOOPBACK}:{tp}" for lp, tp in zip(ports, targets, strict=True)]
        if kind == "relay":
            args = [a for f in fwd for a in ("--forward", f)]
            start("relay", module_cmd("benchmarks.baselines", "relay", *args,
                                      "--read-size", str(msg_size)))
        elif kind == "wspipe":
            ws_port = free_port()
            args = [a for f in fwd for a in ("--forward", f)]
            server = start("server", module_cmd(
                "benchmarks.baselines", "ws-server", "--ws-port", str(ws_port), *args,
                "--msg-size", str(msg_size)))
            wait_listening(ws_port)
            start("agent", module_cmd("benchmarks.baselines", "ws-client", "--ws-port",
                                      str(ws_port), "--msg-size", str(msg_size)))
            server.wait_output("client ready")
        elif kind in ("revdial", "revdial-tls"):
            listen = free_port()
            args = [a for lp, tp in zip(ports, targets, strict=True)
                    for a in ("--forward", f"{LOOPBACK}:{lp}={KEY}/{LOOPBACK}:{tp}")]
            server_tls: list[str] = []
            agent_tls: list[str] = []
            scheme = "ws"
            if kind == "revdial-tls":
                import trustme  # a revdial dependency (its demo's CA)

                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tls-")))
                ca = trustme.CA()
                cert = ca.issue_cert(LOOPBACK)
                ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
                cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
                cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
                server_tls = ["--tls-cert", str(tmp / "cert.pem"), "--tls-key",
                              str(tmp / "key.pem")]
                agent_tls = ["--ca-file", str(tmp / "ca.pem")]
                scheme = "wss"
            server = start("server", revdial_cmd(
                "server", "--listen", f"{LOOPBACK}:{listen}", "--token", TOKEN, *args,
                *server_tls, log_level="info" if log_level == "warning" else log_level))
            wait_listening(listen)
            allow = [a for tp in targets for a in ("--allow", f"{LOOPBACK}:{tp}")]
            start("agent", revdial_cmd(
                "agent", "--server", f"{scheme}://{LOOPBACK}:{listen}/connect", "--id", KEY,
                "--token", TOKEN, *allow, *agent_tls, log_level=log_level))
            server.wait_output(f"client '{KEY}' connected")
        elif kind == "revdial-lib":
            listen = free_port()
            args = [a for f in fwd for a in ("--forward", f)]
            size = ["--frame-size", str(msg_size)]
            for name, value in (limits or {}).items():
                size += ["--limit", f"{name}={value}"]
            server = start("server", module_cmd(
                "benchmarks.revdial_forward", "server", "--listen-port", str(listen),
                *args, *size))
            wait_listening(listen)
            start("agent", module_cmd(
                "benchmarks.revdial_forward", "agent", "--ws-port", str(listen), *size,
                *([] if extensions else ["--no-extensions"])))
            server.wait_output(f"client '{KEY}' connected")
        elif kind == "ssh":
            reason = ssh_unavailable()
            if reason:
                raise RuntimeError(f"ssh baseline unavailable: {reason}")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ssh-")))
            sshd_port = free_port()
            for name in ("host_key", "client_key"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(tmp / name)], check=True)
            (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
            os.chmod(tmp / "authorized_keys", 0o600)
            (tmp / "sshd_config").write_text("\n".join([
                f"ListenAddress {LOOPBACK}",
                f"Port {sshd_port}",
                f"HostKey {tmp / 'host_key'}",
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "MaxStartups 1000",
                "LogLevel ERROR",
                "",
            ]))
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
            start("server", [SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")])
            wait_listening(sshd_port)
            remote = [a for lp, tp in zip(ports, targets, strict=True)
                      for a in ("-R", f"{LOOPBACK}:{lp}:{LOOPBACK}:{tp}")]
            cipher = ["-c", ssh_cipher] if ssh_cipher else []
            # A session with a pty (-tt ... sleep) rather than -N: OpenSSH sets
            # TCP_NODELAY on its connection (both ends) only for interactive
            # sessions; without it every small write waits for Nagle + delayed
            # ACK (~40 ms per echo).
            start("agent", [
                "ssh", "-tt", "-i", str(tmp / "client_key"), "-p", str(sshd_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "LogLevel=ERROR", *cipher, *remote, f"{getpass.getuser()}@{LOOPBACK}",
                "exec sleep 2147483647",
            ])
        else:
            raise ValueError(f"unknown tunnel kind {kind!r}")
        for port in ports:
            wait_listening(port, timeout=15)
        tunnel.check_alive()
        yield tunnel
