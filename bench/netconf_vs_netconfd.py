"""NETCONF get-config / edit-config round trips per second: our sdqkd agent side by side with
Debian's yuma123 `netconfd`, both driven by the same ncclient loop (the controller's waking
session, `sdqkd.controller.southbound.session.connect`, so ncclient's 100 ms TICK does not
hide server time).

yuma123 netconfd (Debian 2.13) refuses the official etsi-qkd-sdn-node ("top-level mandatory
objects are not allowed"), so it serves the small `helloworld` module shipped in
/usr/share/yuma/modules/examples; the edit-config merges /helloworld/message there and
/qkd_node/qkdn_location_id on our agent.

netconfd only listens on a UNIX socket; it is reached through a private OpenSSH `sshd`
(loopback, free port, temporary host and client keys, `Subsystem netconf netconf-subsystem`).
sshd needs its privilege-separation directory /run/sshd, so it runs in its own mount namespace
with a private tmpfs on /run (`unshare -m`): nothing is created outside the temp dir.

    .venv/bin/python bench/netconf_vs_netconfd.py [--n 200]

Needs root (sshd, unshare) and the Debian packages netconfd (yuma123) and openssh-server: the
Makefile's BENCH_DEBS, installed with `make bench-debs` when either is missing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agentproc import PASSWORD, agent_config, free_port  # noqa: E402
from netconf_rtt import measure  # noqa: E402  (bench/ is on sys.path when run as a script)
from sdqkd.controller.southbound.session import connect  # noqa: E402

ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
HELLO = "http://helloworld.com/ns/helloworld"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NETCONFD = "/usr/sbin/netconfd"
SUBSYSTEM = "/usr/sbin/netconf-subsystem"
MODULE = "helloworld"  # /usr/share/yuma/modules/examples/helloworld.yang

console = Console()


class Blocked(RuntimeError):
    """A step needed to run netconfd behind sshd failed; the message says which."""


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def ensure_debs() -> str:
    """netconfd and sshd, installed from the Makefile's BENCH_DEBS if missing; sshd's path."""
    def sshd() -> str | None:
        return shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)

    if not sshd() or not all(os.access(exe, os.X_OK) for exe in (NETCONFD, SUBSYSTEM)):
        console.print("[yellow]netconfd or sshd missing: make bench-debs[/]")
        r = subprocess.run(["make", "-s", "bench-debs"], cwd=ROOT, timeout=300)
        if r.returncode:
            raise Blocked(f"make bench-debs failed (exit {r.returncode})")
    for exe in (NETCONFD, SUBSYSTEM):
        if not os.access(exe, os.X_OK):
            raise Blocked(f"{exe} not found (Debian package netconfd, in BENCH_DEBS)")
    found = sshd()
    if not found:
        raise Blocked("openssh-server installed but no sshd binary found")
    return found


def wait_for(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Blocked(f"{what}: process exited with {proc.returncode}:\n{tail(log)}")
        if cond():
            return
        time.sleep(0.05)
    raise Blocked(f"{what}: not ready after {timeout:.0f} s:\n{tail(log)}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process started here (its own process group, by id)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def kill_leftovers(tmp: Path) -> None:
    """netconf-subsystem and per-connection sshd children run in their own sessions: stop any whose
    command line names our temp dir (they normally exit when the SSH session closes)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp).encode() in cmd:
            try:
                os.kill(int(pid_dir.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


class NetconfdBehindSshd:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sock = tmp / "ncxserver.sock"
        self.port = free_port()
        self.netconfd: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None
        self.client_key = tmp / "client_key"

    def start(self) -> "NetconfdBehindSshd":
        if os.geteuid() != 0:
            raise Blocked("needs root: sshd with a private /run (unshare -m) and root login for netconfd --superuser")
        sshd = ensure_debs()
        tmp = self.tmp
        # netconfd: own socket, own yuma home, no startup file, edits on <running>
        yhome = tmp / "yuma"
        (yhome / "data").mkdir(parents=True)  # txid file (startup-cfg-txid.txt) goes to $YUMA_HOME/data
        nlog = tmp / "netconfd.log"
        self.netconfd = subprocess.Popen(
            [NETCONFD, "--no-startup", f"--module={MODULE}", "--superuser=root", "--target=running",
             f"--port={self.port}",  # netconfd only accepts sessions for ports it is told about
             f"--ncxserver-sockname={self.sock}", f"--yuma-home={yhome}", f"--log={nlog}", "--log-level=info"],
            stdout=open(tmp / "netconfd.out", "ab"), stderr=subprocess.STDOUT, cwd=tmp,
            env={**os.environ, "HOME": str(tmp), "YUMA_HOME": str(yhome)}, start_new_session=True)
        wait_for(self.sock.exists, "netconfd socket", self.netconfd, nlog)
        # keys
        for key in (tmp / "host_key", self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=20)
        shutil.copy(f"{self.client_key}.pub", tmp / "authorized_keys")
        cfg = tmp / "sshd_config"
        cfg.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {tmp / 'host_key'}",
            f"PidFile {tmp / 'sshd.pid'}",
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "LogLevel VERBOSE",
            # netconf-subsystem picks the socket by the SSH port the client reached: PORT@PATH
            f"Subsystem netconf {SUBSYSTEM} --ncxserver-sockname={self.port}@{self.sock}",
            "",
        ]))
        slog = tmp / "sshd.log"
        test = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
        if test.returncode and "privilege separation" not in test.stderr:
            raise Blocked(f"sshd -t rejected the config: {test.stderr.strip()}")
        # sshd insists on /run/sshd: give it a private tmpfs /run in its own mount namespace
        script = f'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd && exec {sshd} -D -e -f "{cfg}"'
        self.sshd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     stdout=open(slog, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: port_open(self.port), "sshd", self.sshd, slog)
        return self

    def connect_kw(self) -> dict:
        return dict(host="127.0.0.1", port=self.port, username="root", key_filename=str(self.client_key),
                    hostkey_verify=False, look_for_keys=False, allow_agent=False, timeout=20)

    def stop(self) -> None:
        stop(self.sshd)
        stop(self.netconfd)


def bench(label: str, kw: dict, edit_xml, check: str, n: int, rows: list) -> None:
    m = connect(**kw)
    try:
        def edit(i: int) -> None:
            m.edit_config(target="running", config=edit_xml(i))

        edit(-1)
        got = m.get_config("running").data_xml
        if "bench--1" not in got:
            raise RuntimeError(f"{label}: edit-config did not land in <running> ({check}): {got[:500]}")
        rows.append((label, "get-config", *measure(lambda i: m.get_config("running"), n)))
        rows.append((label, "edit-config", *measure(edit, n)))
    finally:
        m.close_session()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="round trips per server and operation")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sdqkd-netconfd-"))
    rows: list = []
    agent = None
    yuma = NetconfdBehindSshd(tmp)
    blocked = None
    try:
        try:
            yuma.start()
            bench("yuma123 netconfd 2.13 (via sshd)", yuma.connect_kw(),
                  lambda i: f'<config xmlns="{NC}"><helloworld xmlns="{HELLO}"><message>bench-{i}</message>'
                            f"</helloworld></config>", "/helloworld/message", args.n, rows)
        except Exception as e:  # noqa: BLE001 - report what blocked netconfd, still measure ours
            blocked = f"{type(e).__name__}: {e}"
            for name in ("sshd.log", "netconfd.log"):
                if (tmp / name).exists() and name not in blocked:
                    blocked += f"\n--- {name} ---\n{tail(tmp / name)}"
        finally:
            yuma.stop()
        agent = agent_config(tmp / "agent").start()
        bench("sdqkd agent", dict(host="127.0.0.1", port=agent.port, username="admin", password=PASSWORD,
                                  hostkey_verify=False, look_for_keys=False, allow_agent=False, timeout=20),
              lambda i: f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}">'
                        f"<qkdn_location_id>bench-{i}</qkdn_location_id></qkd_node></config>",
              "/qkd_node/qkdn_location_id", args.n, rows)
    finally:
        if agent:
            agent.stop()
        yuma.stop()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title=f"NETCONF round trips, same ncclient loop (waking session), loopback, n={args.n}")
    for col in ("server", "operation", "p50 ms", "p99 ms", "round trips/s", "vs netconfd"):
        table.add_column(col)
    base = {op: rate for server, op, _, _, rate in rows if server.startswith("yuma123")}
    for server, op, p50, p99, rate in rows:
        table.add_row(server, op, f"{p50:.2f}", f"{p99:.2f}", f"{rate:.0f}",
                      f"{rate / base[op]:.2f}x" if op in base else "n/a")
    console.print(table)
    console.print(f"Note: netconfd served the yuma123 example module `{MODULE}` "
                  "(/usr/share/yuma/modules/examples/helloworld.yang; edit-config merges /helloworld/message), "
                  "because it refuses the official etsi-qkd-sdn-node (error 384, top-level mandatory qkdn_id). "
                  "Our agent serves etsi-qkd-sdn-node (edit-config merges /qkd_node/qkdn_location_id). "
                  "netconfd is reached through OpenSSH sshd + netconf-subsystem; our agent speaks SSH itself.")
    if blocked:
        console.print(f"[bold red]netconfd could not be benchmarked:[/] {blocked}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
