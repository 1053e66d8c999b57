"""One strongSwan `charon` in a lab host's network namespace, holding that host's ends of
QKD-keyed IKEv2/ESP tunnels (one connection each), driven over its VICI socket.

The kernel here has no ESP algorithms, so ESP runs in user space (kernel-libipsec, a TUN
device). charon's pid file and VICI socket sit at fixed paths under /run, so each daemon
gets a private mount namespace with its own directory bound over /run; we reach its
socket through /proc/<pid>/root. Secrets (the IKE PSK, the RFC 8784 PPK) are loaded over
VICI only, never written to a file, and charon logs at level 1 (its key dumps are level 4).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici

from sdqkd.private import open_append, private_dir, write_private

CHARON = "/usr/lib/ipsec/charon"
# What kernel-libipsec can do: no AEAD in its ESP, so CBC + HMAC.
IKE_PROPOSAL = "aes256-sha256-x25519"
ESP_PROPOSAL = "aes256-sha256"
_PLUGINS = ("random nonce aes sha1 sha2 hmac gmp curve25519 kdf x509 pubkey pkcs1 pem "
            "kernel-libipsec kernel-netlink socket-default vici")


class StrongswanError(Exception):
    """charon did not start, refused a command, or an SA did not come up."""


@dataclass(frozen=True)
class Endpoint:
    """One end as the other end sees it: the IKE address and the protected (inner) address."""

    address: str
    inner: str


@dataclass(frozen=True)
class SaState:
    """What `list-sas` says about the tunnel, without any key."""

    ike_state: str
    ike_spi_i: str
    ike_spi_r: str
    ppk: bool
    established: int  # seconds since the IKE SA was established
    child_state: str | None
    child_spi_in: str | None
    child_spi_out: str | None

    def as_json(self) -> dict[str, Any]:
        return {"ike": {"state": self.ike_state, "spi_i": self.ike_spi_i, "spi_r": self.ike_spi_r,
                        "ppk": self.ppk, "established_s": self.established},
                "child": {"state": self.child_state, "spi_in": self.child_spi_in, "spi_out": self.child_spi_out}}


def strongswan_conf(dir: Path) -> str:
    return f"""charon {{
  load = {_PLUGINS}
  make_before_break = yes
  install_routes = yes
  filelog {{
    log {{
      path = {dir / "charon.log"}
      default = 1
      time_format = %T
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
swanctl {{
  load = pem pkcs1 x509 pubkey random nonce sha1 sha2 aes hmac
}}
"""


class Charon:
    """The daemon of a lab host (netns `netns`), its files in `dir`; one connection per tunnel,
    as only one daemon can hold the host's IKE ports."""

    def __init__(self, netns: str, dir: Path | str) -> None:
        self.netns = netns
        self.dir = Path(dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conns: set[str] = set()

    @property
    def conf(self) -> Path:
        return self.dir / "strongswan.conf"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> None:
        """Spawn charon and wait for its VICI socket."""
        run = self.dir / "run"
        private_dir(run)  # charon's VICI socket: whoever connects to it can load keys
        write_private(self.conf, strongswan_conf(self.dir))
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "STRONGSWAN_CONF": str(self.conf)}
        with os.fdopen(open_append(self.dir / "charon.out"), "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", 'mount --bind "$0" /run && exec "$1"', str(run), CHARON],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StrongswanError(f"charon in {self.netns} exited with {self.proc.returncode}: "
                                      f"{(self.dir / 'charon.out').read_text(errors='replace')[-500:]}")
            try:
                with self._session():
                    return
            except StrongswanError:
                time.sleep(0.05)
        self.stop()
        raise StrongswanError(f"charon in {self.netns} did not open its VICI socket in {timeout} s")

    def _session(self) -> _Vici:
        if self.pid is None:
            raise StrongswanError(f"charon in {self.netns} is not running")
        try:
            return _Vici(f"/proc/{self.pid}/root/run/charon.vici")
        except OSError as exc:
            raise StrongswanError(f"charon in {self.netns} does not answer: {exc.strerror}") from None

    def load(self, conn: str, local: Endpoint, remote: Endpoint, psk: bytes, ppk_id: str, ppk: bytes) -> None:
        """Connection `conn` (its CHILD_SA has the same name): PSK authentication, PPK required."""
        cfg = {
            "version": "2", "local_addrs": [local.address], "remote_addrs": [remote.address],
            "proposals": [IKE_PROPOSAL], "ppk_id": ppk_id, "ppk_required": "yes",
            "encap": "yes", "mobike": "no", "rekey_time": "0", "dpd_delay": "0",
            "local-1": {"auth": "psk", "id": local.address},
            "remote-1": {"auth": "psk", "id": remote.address},
            "children": {conn: {"local_ts": [f"{local.inner}/32"], "remote_ts": [f"{remote.inner}/32"],
                                "esp_proposals": [ESP_PROPOSAL], "mode": "tunnel", "rekey_time": "0",
                                "start_action": "none", "close_action": "none"}},
        }
        with self._session() as s:
            s.call("load_shared", {"id": f"psk-{conn}", "type": "IKE", "data": psk,
                                   "owners": [local.address, remote.address]})
            s.call("load_conn", {conn: cfg})
        self.conns.add(conn)
        self.set_ppk(conn, ppk_id, ppk)

    def set_ppk(self, conn: str, ppk_id: str, ppk: bytes) -> None:
        """Replace the PPK of `conn` (known to charon as `ppk_id`); SAs built from now on use it."""
        with self._session() as s:
            s.call("load_shared", {"id": f"ppk-{conn}", "type": "PPK", "data": ppk, "owners": [ppk_id]})

    def initiate(self, conn: str, timeout: float = 10.0) -> None:
        """Build the IKE SA and the CHILD_SA; raises if IKE_AUTH or the CHILD_SA fails."""
        with self._session() as s:
            s.call("initiate", {"child": conn, "ike": conn, "timeout": str(int(timeout * 1000))}, streamed=True)

    def reauthenticate(self, conn: str, timeout: float = 10.0) -> SaState:
        """A new IKE SA (fresh keys, the PPK loaded now) replaces the old one, make-before-break;
        returns once the new SA and its CHILD_SA are up."""
        before = self.state(conn)
        if before is None:
            raise StrongswanError("no IKE SA to re-authenticate")
        with self._session() as s:
            s.call("rekey", {"ike": conn, "reauth": "yes"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.state(conn)
            if (now is not None and now.child_state == "INSTALLED" and now.ike_state == "ESTABLISHED"
                    and now.ike_spi_i != before.ike_spi_i):
                return now
            time.sleep(0.05)
        raise StrongswanError(f"re-authentication did not complete in {timeout} s")

    def state(self, conn: str) -> SaState | None:
        """The newest established IKE SA of `conn`, or None."""
        with self._session() as s:
            sas = s.list_sas(conn)
        best: SaState | None = None
        for sa in sas:
            ike = sa.get(conn)
            if ike is None:
                continue
            children = list(ike.get("child-sas", {}).values())
            child = children[-1] if children else {}
            st = SaState(
                ike_state=_s(ike.get("state")), ike_spi_i=_s(ike.get("initiator-spi")),
                ike_spi_r=_s(ike.get("responder-spi")), ppk=_s(ike.get("ppk")) == "yes",
                established=int(_s(ike.get("established")) or 0),
                child_state=_s(child.get("state")) or None, child_spi_in=_s(child.get("spi-in")) or None,
                child_spi_out=_s(child.get("spi-out")) or None)
            if st.ike_state == "ESTABLISHED" and (best is None or st.established <= best.established):
                best = st
        return best

    def unload(self, conn: str) -> None:
        """Close the SAs of `conn` (DELETE to the peer) and forget it and its secrets."""
        self.conns.discard(conn)
        with self._session() as s:
            _terminate(s, conn)
            for cmd, arg in (("unload_conn", {"name": conn}), ("unload_shared", {"id": f"psk-{conn}"}),
                             ("unload_shared", {"id": f"ppk-{conn}"})):
                try:
                    s.call(cmd, arg)
                except StrongswanError:
                    pass  # already gone

    def stop(self, timeout: float = 5.0) -> None:
        """Close every SA, then end charon; nothing is left running."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with _Vici(f"/proc/{proc.pid}/root/run/charon.vici") as s:
                    for conn in self.conns:
                        _terminate(s, conn)
            except OSError:
                pass  # the daemon is already going: SIGTERM below does the rest
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.conns.clear()

    def remove(self) -> None:
        """Stop and delete the instance directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _terminate(s: _Vici, conn: str) -> None:
    try:
        s.call("terminate", {"ike": conn, "timeout": "2000", "force": "yes"}, streamed=True)
    except StrongswanError:
        pass  # no SA to close


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


class _Vici:
    """A VICI session whose errors become StrongswanError (messages are charon's, keyless)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        try:
            self.sock.settimeout(15)
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.session = vici.Session(self.sock)

    def __enter__(self) -> _Vici:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def call(self, command: str, arg: dict[str, Any], *, streamed: bool = False) -> Any:
        try:
            result = getattr(self.session, command)(arg)
            return list(result) if streamed else result
        except vici.exception.CommandException as exc:
            raise StrongswanError(f"charon refused {command}: {exc}") from None
        except (vici.exception.SessionException, OSError) as exc:
            raise StrongswanError(f"VICI {command} failed: {type(exc).__name__}") from None

    def list_sas(self, conn: str) -> list[dict[str, Any]]:
        try:
            return list(self.session.list_sas({"ike": conn}))
        except (vici.exception.SessionException, vici.exception.CommandException, OSError) as exc:
            raise StrongswanError(f"VICI list-sas failed: {type(exc).__name__}") from None
