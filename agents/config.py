"""The agent's own configuration file (JSON), which `sdqkd lab up` writes per node.

Faucet's Conf in small: dataclasses declare fields, types and defaults; parsing
rejects unknown keys and wrong types and reports every problem at once as one
ConfigError, before anything starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.configfile import ConfigError, parse_into, read_json
from sdqkd.listen import is_loopback


MAX_ENTROPY_REQUEST = 1 << 16  # bytes: upper bound of qrng.max_request_bytes


@dataclass
class UserConf:
    name: str
    password_hash: str | None = None
    authorized_keys: list[str] = field(default_factory=list)


@dataclass
class NetconfConf:
    port: int
    host_key: str
    users: list[UserConf]
    address: str = "127.0.0.1"
    # Bounds on what a client may hold or send (see agents/netconf/session.py and ssh.py).
    max_message_size: int = 32 * 1024 * 1024  # bytes; a larger request ends the session (rpc-error too-big)
    hello_timeout: float = 30.0  # s from channel open to the client's <hello>
    login_timeout: float = 30.0  # s from TCP accept to login, and from login to the NETCONF channel
    max_auth_tries: int = 6  # failed logins per connection
    max_startups: int = 32  # connections still logging in
    auth_failure_delay: float = 0.5  # s after a failed password; doubles per failure from the address


@dataclass
class NodeConf:
    name: str
    qkdn_id: str
    location: str | None = None


@dataclass
class PlantConf:
    """The emulated optical plant shared by the lab's agents."""

    # The plant's description, as `sdqkd lab up` resolves it from the topology (sdqkd-lab
    # RFC 7951 names): switches, every node's QKD interfaces (channel, switch attachment),
    # fibres and links. Every agent of a lab gets the same; none reads the topology file.
    inventory: dict[str, Any]
    state: str  # shared SQLite file


@dataclass
class Etsi014DeviceConf:
    """A real QKD device reached through its own ETSI GS QKD 014 API (agent = SAE)."""

    url: str
    sae_id: str
    peer_sae_id: str
    ca: str
    cert: str
    key: str
    timeout: float = 5.0
    poll: float = 0.5


@dataclass
class QkdModuleConf:
    qkdi_id: int
    profile: dict[str, Any]  # the module's QKD profile, resolved (sdqkd-lab `profile` leaves, calibrated)
    channel: int | None = None  # a fixed DWDM channel, when the module has one
    role: str = "TRANSCEIVER"
    driver: str = "qkd-emulated"  # or "qkd-etsi014"
    service_port: int = 0
    device: str | None = None  # switch the module is patched into (ETSI 015 qkdi_att_point)
    port: int | None = None
    etsi014: Etsi014DeviceConf | None = None


@dataclass
class QrngConf:
    """The node's entropy source for end keys."""

    source: str = "emulated"  # or "os"
    rate: float | None = None  # bit/s of the emulated device
    max_request_bytes: int = 1024  # largest GET /api/v1/entropy request (agents/qaas/entropy.py)


@dataclass
class PeerConf:
    """Another node: its name, where its QKD modules' service channels and its
    forwarding module listen."""

    node: str
    service: dict[str, list[Any]] = field(default_factory=dict)  # qkdi_id -> [host, port]
    relay: list[Any] = field(default_factory=list)  # [host, port]
    # The pin of its KME certificate's public key (pki.spki_pin: "sha256/<base64>"), like the
    # NETCONF host-key fingerprint: the relay accepts this peer only with that key, both ways.
    kme_pin: str | None = None


@dataclass
class Etsi004JsonConf:
    """ETSI 004 in the JSON command form over TCP (agents/kms/etsi004_json.py), for the
    MadQCI-style clients such as UPM's hybridization module. Mutual TLS, the SAE named by
    its client certificate; `plain` serves plain TCP instead (that module speaks nothing
    else), only on a loopback address, where every local process is trusted."""

    port: int
    address: str | None = None  # default: the kms address
    plain: bool = False
    read_timeout: float = 10.0  # s for a whole request to arrive
    handshake_timeout: float = 10.0  # s for the TLS handshake
    max_request: int = 64 * 1024  # bytes
    max_connections: int = 64
    workers: int = 8  # LKMS calls at once


@dataclass
class Etsi004BinaryConf:
    """The ETSI 004 binary protocol (agents/kms/etsi004_binary.py) on a port of its own,
    mutual TLS with the KMS certificate; the bounds a client cannot stretch."""

    port: int
    read_timeout: float = 10.0  # s for a whole request to arrive
    handshake_timeout: float = 10.0  # s
    max_connections: int = 64
    workers: int = 8  # LKMS calls at once


@dataclass
class KmsConf:
    """The LKMS: ETSI 014/004 HTTPS, forwarding-module relay, and the lab PKI.

    Two CAs: `sae_ca` issues the applications' client certificates (the only ones the
    key-delivery port accepts as callers), `kme_ca` the KMEs' (the only ones the relay port
    accepts, and then from a configured peer with its pinned key only). The old single
    `ca` is refused with a message saying so (a lab made before the split: `sdqkd lab up`
    again writes the new form)."""

    port: int
    relay_port: int
    cert: str  # this KME's certificate (CN = qkdn_id, from kme_ca), for HTTPS and relay
    key: str
    sae_ca: str | None = None
    kme_ca: str | None = None
    ca: str | None = None  # before the split: refused with an explanation
    saes: dict[str, str] = field(default_factory=dict)  # every SAE of the network -> qkdn_id
    address: str = "127.0.0.1"
    key_size: int = 256
    default_ttl: int = 3600
    path_wait: float = 10.0  # s a one-call key request (agents/qaas/keys.py) waits for the controller's path
    link_key_limit: int = 100_000  # link keys a link holds here at most, like a device's key buffer
    # Bounds on the relay port's inbound connections (agents/kms/forwarding.py)
    relay_idle_timeout: float = 120.0  # s an established connection may stay without a request
    relay_handshake_timeout: float = 10.0  # s from TCP accept to an authorized peer
    relay_max_connections: int = 64  # inbound connections at once, handshaking ones included
    relay_max_handshakes: int = 16  # of which still in their TLS handshake (a new one drops the oldest)
    relay_max_per_peer: int = 8  # established connections from one peer
    relay_workers: int = 8  # threads handling relay messages (the connections wait in one selector)
    etsi004_json: Etsi004JsonConf | None = None  # off unless configured (`sdqkd lab up` configures it)
    etsi004_binary: Etsi004BinaryConf | None = None  # not served without
    # Bounds of the HTTPS front end under abuse (agents/kms/web.py Limits): s for a TLS
    # handshake, a request head and a request body each; TCP connections open at once.
    header_timeout: float = 10.0
    max_connections: int = 512


@dataclass
class IpsecPeerConf:
    """Another node's lab host, and the HTTPS API that sets up its tunnel ends."""

    api: list[Any]  # [host, port]
    sae_id: str
    address: str
    inner: str


@dataclass
class IpsecConf:
    """This node's lab host (network namespace) where its QKD-keyed IPsec tunnels end:
    outer address on the lab LAN, inner (protected) address, the SAE its keys are for."""

    netns: str
    address: str
    inner: str
    sae_id: str
    peers: dict[str, IpsecPeerConf] = field(default_factory=dict)  # node name -> its host


@dataclass
class SwitchConf:
    name: str
    ports: int
    insertion_loss: float = 1.0


@dataclass
class MetricsConf:
    """The Prometheus endpoint, GET http://address:port/metrics (agents/metrics.py); port 0:
    not served. Plain HTTP without authentication: it carries no key material or key ID,
    but says what links and peers the node has, so it listens on loopback unless told."""

    port: int = 0
    address: str = "127.0.0.1"


@dataclass
class RestconfConf:
    """The RESTCONF (RFC 8040) front end over HTTPS (agents/restconf/); absent: off.
    Clients log in as a NETCONF user: HTTP basic, or a certificate from `client_ca`
    whose common name is the user's name."""

    port: int
    cert: str
    key: str
    host: str = "127.0.0.1"
    client_ca: str | None = None


@dataclass
class AgentConfig:
    node: NodeConf
    netconf: NetconfConf
    state_dir: str
    plant: PlantConf | None = None
    service_key: str | None = None  # hex; authenticates the QKD service channels of the lab
    qkd_modules: list[QkdModuleConf] = field(default_factory=list)
    switches: list[SwitchConf] = field(default_factory=list)
    peers: dict[str, PeerConf] = field(default_factory=dict)  # qkdn_id -> peer
    kms: KmsConf | None = None
    qrng: QrngConf | None = None
    ipsec: IpsecConf | None = None
    restconf: RestconfConf | None = None
    log_level: str = "INFO"
    metrics: MetricsConf | None = None  # absent: no metrics endpoint
    # Where running is persisted on every commit (agents/datastore/store.py): a restarted
    # node comes back with it. Default: running.xml in state_dir.
    running_path: str | None = None

    @property
    def startup_path(self) -> Path:
        return Path(self.state_dir) / "startup.xml"

    @property
    def running_file(self) -> Path:
        """The persisted running datastore (`running_path`, else state_dir/running.xml)."""
        return Path(self.running_path) if self.running_path else Path(self.state_dir) / "running.xml"


def load(path: Path) -> AgentConfig:
    return parse(read_json(path))


def parse(data: dict[str, Any]) -> AgentConfig:
    problems: list[str] = []
    cfg = parse_into(AgentConfig, data, "config", problems)
    if cfg is not None and not problems:
        problems.extend(_check(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_kms(cfg: AgentConfig) -> list[str]:
    from sdqkd import pki

    k = cfg.kms
    assert k is not None
    problems = []
    if k.ca is not None:
        problems.append("config.kms.ca: one CA for applications and KMEs is no longer accepted: give kms.sae_ca "
                        "(the CA of the SAE client certificates) and kms.kme_ca (the CA of the KME certificates), "
                        "and each relay peer's kme_pin; a lab writes them (`sdqkd lab up` again)")
    for name in ("sae_ca", "kme_ca"):
        path = getattr(k, name)
        if path is None:
            if k.ca is None:
                problems.append(f"config.kms.{name}: missing")
        elif (why := pki.check_ca(path)) is not None:
            problems.append(f"config.kms.{name}: {path}: {why}")
    if k.sae_ca is not None and k.kme_ca is not None and k.sae_ca == k.kme_ca:
        problems.append("config.kms.sae_ca, kme_ca: must be two different CAs")
    for qid, peer in cfg.peers.items():
        if peer.relay and peer.kme_pin is None:
            problems.append(f"config.peers.{qid}.kme_pin: a relay peer needs the pin of its KME key "
                            "(pki.spki_pin: sha256/<base64 of the SHA-256 of its SubjectPublicKeyInfo>)")
        elif peer.kme_pin is not None and not pki.is_pin(peer.kme_pin):
            problems.append(f"config.peers.{qid}.kme_pin: expected sha256/<base64 of 32 bytes>")
    if not (0 < k.relay_idle_timeout <= 86400 and 0 < k.relay_handshake_timeout <= 300):
        problems.append("config.kms.relay_idle_timeout (0..86400 s), relay_handshake_timeout (0..300 s): out of range")
    if min(k.relay_max_connections, k.relay_max_handshakes, k.relay_max_per_peer, k.relay_workers) < 1:
        problems.append("config.kms.relay_max_connections, relay_max_handshakes, relay_max_per_peer, relay_workers: at least 1")
    return problems


def _check(cfg: AgentConfig) -> list[str]:
    problems = []
    if not (0 <= cfg.netconf.port <= 65535):
        problems.append("config.netconf.port: out of range")
    if not cfg.netconf.users:
        problems.append("config.netconf.users: at least one user is needed")
    nc = cfg.netconf
    if not 1024 <= nc.max_message_size <= 1 << 31:
        problems.append("config.netconf.max_message_size: from 1024 to 2147483648 bytes")
    if not (0 < nc.hello_timeout <= 3600 and 0 < nc.login_timeout <= 3600):
        problems.append("config.netconf.hello_timeout, login_timeout: from 0 to 3600 s")
    if nc.max_auth_tries < 1 or nc.max_startups < 1 or not 0 <= nc.auth_failure_delay <= 60:
        problems.append("config.netconf: max_auth_tries and max_startups at least 1, auth_failure_delay from 0 to 60 s")
    for u in cfg.netconf.users:
        if not u.password_hash and not u.authorized_keys:
            problems.append(f"config.netconf.users.{u.name}: needs a password_hash or authorized_keys")
    ids = [m.qkdi_id for m in cfg.qkd_modules]
    if len(ids) != len(set(ids)):
        problems.append("config.qkd_modules: qkdi_id values repeat")
    if any(m.driver == "qkd-emulated" for m in cfg.qkd_modules) and cfg.plant is None:
        problems.append("config.plant: emulated QKD modules need the lab's optical plant")
    for m in cfg.qkd_modules:
        if m.driver == "qkd-etsi014" and m.etsi014 is None:
            problems.append(f"config.qkd_modules[{m.qkdi_id}].etsi014: a qkd-etsi014 module needs its device's API")
    names: dict[str, str] = {cfg.node.name.lower(): cfg.node.qkdn_id}
    for qid, peer in cfg.peers.items():  # the node directory the QaaS APIs resolve names with
        if peer.node.lower() in names:
            problems.append(f"config.peers.{qid}.node: name {peer.node!r} is already another node's")
        names.setdefault(peer.node.lower(), qid)
    if cfg.kms is not None:
        problems.extend(_check_kms(cfg))
    if cfg.kms is not None and not 0 <= cfg.kms.path_wait <= 300:
        problems.append("config.kms.path_wait: from 0 to 300 s")
    if cfg.kms is not None and cfg.kms.link_key_limit < 1:
        problems.append("config.kms.link_key_limit: at least 1")
    if cfg.kms is not None and cfg.kms.etsi004_json is not None:
        problems.extend(_check_etsi004_json(cfg.kms))
    if cfg.kms is not None and (b := cfg.kms.etsi004_binary) is not None:
        where = "config.kms.etsi004_binary"
        if not 0 <= b.port <= 65535:
            problems.append(f"{where}.port: out of range")
        if not (0 < b.read_timeout <= 3600 and 0 < b.handshake_timeout <= 3600):
            problems.append(f"{where}: read_timeout and handshake_timeout from 0 to 3600 s")
        if not (1 <= b.max_connections <= 10_000 and 1 <= b.workers <= 256):
            problems.append(f"{where}: max_connections from 1 to 10000, workers from 1 to 256")
    if cfg.kms is not None and not 0 < cfg.kms.header_timeout <= 300:
        problems.append("config.kms.header_timeout: from 0 to 300 s")
    if cfg.kms is not None and not 1 <= cfg.kms.max_connections <= 65536:
        problems.append("config.kms.max_connections: from 1 to 65536")
    if cfg.qrng is not None and cfg.qrng.source not in ("emulated", "os"):
        problems.append("config.qrng.source: 'emulated' or 'os'")
    if cfg.qrng is not None and cfg.qrng.source == "emulated" and not cfg.qrng.rate:
        problems.append("config.qrng.rate: an emulated QRNG needs its rate (bit/s)")
    if cfg.metrics is not None and not 0 <= cfg.metrics.port <= 65535:
        problems.append("config.metrics.port: out of range (0: not served)")
    if cfg.restconf is not None:
        problems += _check_restconf(cfg.restconf)
    if cfg.ipsec is not None and cfg.kms is None:
        problems.append("config.ipsec: IPsec tunnels take their keys from the LKMS, which needs config.kms")
    if cfg.qrng is not None and not (32 <= cfg.qrng.max_request_bytes <= MAX_ENTROPY_REQUEST):
        problems.append(f"config.qrng.max_request_bytes: between 32 (the default request) and {MAX_ENTROPY_REQUEST}")
    return problems


def _check_restconf(rc: RestconfConf) -> list[str]:
    """What would otherwise fail only once the agent starts its RESTCONF server (or, for a
    client CA, at the first client certificate)."""
    from sdqkd import pki

    problems = [] if 0 <= rc.port <= 65535 else ["config.restconf.port: out of range"]
    for name in ("cert", "key"):
        if not Path(getattr(rc, name)).is_file():
            problems.append(f"config.restconf.{name}: {getattr(rc, name)}: no such file")
    if rc.client_ca is not None and (why := pki.check_ca(rc.client_ca)) is not None:
        problems.append(f"config.restconf.client_ca: {rc.client_ca}: {why}")
    return problems


def _check_etsi004_json(kms: KmsConf) -> list[str]:
    j = kms.etsi004_json
    assert j is not None
    where = "config.kms.etsi004_json"
    problems = [] if 0 <= j.port <= 65535 else [f"{where}.port: out of range"]
    address = j.address or kms.address
    if j.port and address == kms.address and j.port in (kms.port, kms.relay_port):
        problems.append(f"{where}.port: {j.port} is already the kms HTTPS or relay port")
    if j.plain and not is_loopback(address):
        problems.append(f"{where}.plain: plain TCP only on a loopback address, not {address} "
                        "(anyone on the network could claim any SAE)")
    if not (0 < j.read_timeout <= 3600 and 0 < j.handshake_timeout <= 3600):
        problems.append(f"{where}: read_timeout and handshake_timeout from 0 to 3600 s")
    if not 256 <= j.max_request <= 1 << 24:
        problems.append(f"{where}.max_request: from 256 to 16777216 bytes")
    if not (1 <= j.max_connections <= 10_000 and 1 <= j.workers <= 256):
        problems.append(f"{where}: max_connections from 1 to 10000, workers from 1 to 256")
    return problems
