"""The `sdqkd` command: one entry point for operators, the lab and CI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from sdqkd import __version__, bindgen, yangmodels
from sdqkd.listen import ListenError
from sdqkd import private

EXIT_LISTEN = 3  # an agent or the controller could not take one of its ports


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdqkd")
def main() -> None:
    """Software-defined QKD network: agents, controller and lab."""


@main.group()
def yang() -> None:
    """The YANG modules in yang/ and the bindings made from them."""


def _regenerate(generate, drift, stale: str, check: bool) -> None:  # type: ignore[no-untyped-def]
    """Write generated code, or with --check only report how it differs."""
    if check:
        problems = drift()
        for p in problems:
            click.echo(p, err=True)
        if problems:
            raise click.ClickException(stale)
        click.echo("generated code is up to date")
        return
    for name in generate():
        click.echo(f"wrote {name}")


@yang.command("bindings")
@click.option("--check", is_flag=True, help="Only report drift between bindings/ and yang/.")
def yang_bindings(check: bool) -> None:
    """Regenerate bindings/ with pyangbind (or check it is up to date)."""
    _regenerate(bindgen.generate, bindgen.drift, "bindings/ differs from what yang/ generates: run `make bindings`", check)


@yang.command("lint")
def yang_lint() -> None:
    """Run `pyang --strict` over every module of yang/."""
    files = [str(m.path) for m in yangmodels.modules().values()]
    proc = subprocess.run(yangmodels.pyang_command("--strict", *files))
    sys.exit(proc.returncode)


@main.command("proto")
@click.option("--check", is_flag=True, help="Only report drift between the proto and the generated code.")
def proto(check: bool) -> None:
    """Regenerate the controller's gRPC code from controller/northbound/sdqkd.proto."""
    from sdqkd.controller.northbound import codegen

    _regenerate(codegen.generate, codegen.drift, "generated gRPC code is stale: run `sdqkd proto`", check)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Agent config (JSON).")
def agent(config_path: str) -> None:
    """Run one SD-QKD node agent (NETCONF server, drivers) until SIGTERM/SIGINT."""
    from sdqkd.agents.main import run  # also `python -m sdqkd.agents`, what `lab up` starts

    raise SystemExit(run(config_path))


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Controller config (JSON).")
def controller(config_path: str) -> None:
    """Run the SDN controller (southbound NETCONF or RESTCONF, path computation, gRPC northbound)."""
    import logging
    import signal
    import threading

    from sdqkd.configfile import ConfigError
    from sdqkd.controller import config as controller_config
    from sdqkd.controller.daemon import serve

    private.private_process(config_path)
    try:
        cfg = controller_config.load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"config error: {problem}", err=True)
        raise SystemExit(2) from None
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve(cfg, stop)
    except ListenError as exc:
        click.echo(f"error: controller: {exc}", err=True)
        raise SystemExit(EXIT_LISTEN) from None


lab_dir_option = click.option(
    "--lab-dir", type=click.Path(file_okay=False), envvar="SDQKD_LAB_DIR", show_envvar=True,
    help="Where labs keep their state (default: the nearest .sdqkd/ from here up, else ./.sdqkd).")


def _labs(lab_dir: str | None) -> Path:
    from sdqkd.lab import labjson

    return labjson.labs_root(lab_dir)


def _find_lab(lab_name: str | None, lab_dir: str | None) -> dict:  # type: ignore[type-arg]
    """lab.json of the named (or only) running lab; a ClickException when there is none."""
    from sdqkd.lab import labjson

    try:
        return labjson.read(labjson.find(lab_name, _labs(lab_dir)))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


def _topology_problems(file: str, problems: list) -> None:  # type: ignore[type-arg]
    """What `lab check` prints and `lab up` refuses with: one line per problem, exit 1."""
    for p in problems:
        click.echo(f"{file}: {p}", err=True)
    sys.exit(1)


@main.group()
def lab() -> None:
    """Emulated QKD networks on loopback."""


@lab.command("up")
@click.argument("topology", type=click.Path(exists=True, dir_okay=False))
@click.option("--free-ports", is_flag=True, help="Pick free loopback ports instead of the topology's port bases.")
@lab_dir_option
def lab_up(topology: str, free_ports: bool, lab_dir: str | None) -> None:
    """Bring up a lab: one agent per node and the controller, on loopback."""
    from rich.console import Console

    from sdqkd.lab import launcher, topology as lab_topology

    console = Console(stderr=True)
    root = _labs(lab_dir)
    private.private_process()
    try:
        data = launcher.up(Path(topology), root, free_ports=free_ports, console=console)
    except lab_topology.TopologyError as exc:
        _topology_problems(topology, exc.problems)
    except (launcher.LabError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    launcher.render(launcher.status(data["name"], root), Console())


@lab.command("down")
@click.argument("name", required=False)
@click.option("--cleanup", is_flag=True, help="Also remove the lab directory (certificates, key stores, logs).")
@lab_dir_option
def lab_down(name: str | None, cleanup: bool, lab_dir: str | None) -> None:
    """Stop every process of a lab (also those `lab start` started) and remove its lab.json."""
    from sdqkd.lab import launcher

    try:
        click.echo(f"lab {launcher.down(name, _labs(lab_dir), cleanup=cleanup)} is down")
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


@lab.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@lab_dir_option
def lab_status(name: str | None, as_json: bool, lab_dir: str | None) -> None:
    """Nodes (and which are down), fibres cut, links and key rates of a running lab."""
    from rich.console import Console

    from sdqkd.lab import launcher

    try:
        st = launcher.status(name, _labs(lab_dir))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(launcher.as_json(st))
    else:
        launcher.render(st, Console())


lab_name_option = click.option("--lab", "lab_name", default=None, envvar="SDQKD_LAB", show_envvar=True,
                               help="Lab name (default: the only running lab).")


def _rehearse(action, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Run one failure-rehearsal step; its outcome in one line, a refusal as one `Error:` line."""
    from sdqkd.lab import launcher

    try:
        click.echo(action(*args, **kwargs))
    except (launcher.LabError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


@lab.command("kill")
@click.argument("node")
@click.option("--signal", "sig", type=click.Choice(["KILL", "TERM", "INT"], case_sensitive=False), default="KILL",
              show_default=True, help="KILL is a crash; TERM and INT let the process stop in order.")
@lab_name_option
@lab_dir_option
def lab_kill(node: str, sig: str, lab_name: str | None, lab_dir: str | None) -> None:
    """Kill NODE's agent (or `controller`) as a crash would, and record it down in lab.json."""
    from sdqkd.lab import failures

    _rehearse(failures.kill, node, lab_name, _labs(lab_dir), sig=sig)


@lab.command("start")
@click.argument("node")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 600),
              help="Seconds to wait for it to listen.")
@lab_name_option
@lab_dir_option
def lab_start(node: str, timeout: float, lab_name: str | None, lab_dir: str | None) -> None:
    """Start NODE's agent (or `controller`) again with its lab config; wait until it listens."""
    from sdqkd.lab import failures

    _rehearse(failures.start, node, lab_name, _labs(lab_dir), timeout=timeout)


@lab.command("cut")
@click.argument("fibre")
@lab_name_option
@lab_dir_option
def lab_cut(fibre: str, lab_name: str | None, lab_dir: str | None) -> None:
    """Cut FIBRE (a name from the topology file): the QKD links over it stop making keys."""
    from sdqkd.lab import failures

    _rehearse(failures.cut, fibre, lab_name, _labs(lab_dir))


@lab.command("splice")
@click.argument("fibre")
@lab_name_option
@lab_dir_option
def lab_splice(fibre: str, lab_name: str | None, lab_dir: str | None) -> None:
    """Splice a cut FIBRE back: the QKD links over it make keys again."""
    from sdqkd.lab import failures

    _rehearse(failures.cut, fibre, lab_name, _labs(lab_dir), splice=True)


@lab.command("qrng-fail")
@click.argument("node")
@click.option("--kind", type=click.Choice(["stuck", "biased", "glitch"]), default="stuck", show_default=True,
              help="stuck: raw samples frozen; biased: P(1) = 0.85 (both until qrng-repair); glitch: 64 samples frozen once.")
@lab_name_option
@lab_dir_option
def lab_qrng_fail(node: str, kind: str, lab_name: str | None, lab_dir: str | None) -> None:
    """Break NODE's emulated QRNG: its health tests trip and it stops delivering entropy."""
    from sdqkd.lab import failures

    _rehearse(failures.qrng, node, kind, lab_name, _labs(lab_dir))


@lab.command("qrng-repair")
@click.argument("node")
@lab_name_option
@lab_dir_option
def lab_qrng_repair(node: str, lab_name: str | None, lab_dir: str | None) -> None:
    """Repair NODE's QRNG: it delivers again once its start-up health tests pass."""
    from sdqkd.lab import failures

    _rehearse(failures.qrng, node, None, lab_name, _labs(lab_dir))


@lab.command("env")
@click.argument("name", required=False)
@lab_dir_option
def lab_env(name: str | None, lab_dir: str | None) -> None:
    """Print a running lab's addresses and credentials as shell variables: eval "$(sdqkd lab env)"."""
    import shlex

    from sdqkd.lab import labjson

    for var, value in labjson.shell_env(_find_lab(name, lab_dir)).items():
        click.echo(f"export {var}={shlex.quote(value)}")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@lab_name_option
@lab_dir_option
def lab_exec(node: str, command: tuple[str, ...], lab_name: str | None, lab_dir: str | None) -> None:
    """Run COMMAND on NODE's lab host (its network namespace), e.g. `lab exec CAIT -- ping 10.78.0.2`."""
    import os

    lab = _find_lab(lab_name, lab_dir)
    found = next((n for n in lab["nodes"] if n["name"].lower() == node.lower()), None)
    if found is None:
        raise click.ClickException(f"no node {node!r} in lab {lab['name']} (nodes: {', '.join(n['name'] for n in lab['nodes'])})")
    if not found.get("host"):
        with_host = [n["name"] for n in lab["nodes"] if n.get("host")]
        raise click.ClickException(f"node {found['name']} has no lab host (nodes with one: {', '.join(with_host) or 'none'})")
    try:
        os.execvp("ip", ["ip", "netns", "exec", found["host"]["netns"], *command])
    except OSError as exc:
        raise click.ClickException(f"ip netns exec: {exc.strerror}") from None


@main.group()
def topo() -> None:
    """The network of a running lab."""


@topo.command("plot")
@lab_name_option
@click.option("-o", "--output", default=None, help="PNG file (default: <lab dir>/topology.png).")
@lab_dir_option
def topo_plot(lab_name: str | None, output: str | None, lab_dir: str | None) -> None:
    """Write a PNG of the network: nodes, fibres, switches with their cross-connects and
    wavelengths, and every QKD link with its live key rate and status."""
    from sdqkd.controller.northbound import sdqkd_pb2 as pb
    from sdqkd.lab import plot

    lab = _find_lab(lab_name, lab_dir)
    out = Path(output) if output else Path(lab["dir"]) / "topology.png"
    topo = _controller_call(lab, "GetTopology", pb.GetTopologyRequest()).topology
    channels = list(_controller_call(lab, "ListChannels", pb.ListChannelsRequest()).channels)
    title = f"lab {lab['name']}"
    click.echo(f"wrote {plot.write(topo, channels, out, title)}")


def _controller_call(lab: dict, rpc: str, request, timeout: float = 10):  # type: ignore[no-untyped-def, type-arg]
    """One call to the lab's controller with the orchestrator certificate from lab.json."""
    import grpc

    from sdqkd.lab import launcher

    try:
        return getattr(launcher.controller_stub(lab["controller"]), rpc)(request, timeout=timeout)
    except launcher.LabError as exc:
        raise click.ClickException(str(exc)) from None
    except grpc.RpcError as exc:
        raise click.ClickException(f"controller: {exc.code().name}: {exc.details()}") from None


@topo.command("reservations")
@lab_name_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@lab_dir_option
def topo_reservations(lab_name: str | None, as_json: bool, lab_dir: str | None) -> None:
    """Per QKD link: its key rate, what applications hold on it (their min_bps) and what is left."""
    import json

    from sdqkd.controller.northbound import sdqkd_pb2 as pb

    lab = _find_lab(lab_name, lab_dir)
    links = _controller_call(lab, "ListReservations", pb.ListReservationsRequest()).links
    rows = [{"qkdl_id": r.qkdl_id, "a": r.a.name or r.a.qkdn_id, "b": r.b.name or r.b.qkdn_id, "status": r.status,
             "capacity_bps": r.capacity_bps, "reserved_bps": r.reserved_bps, "available_bps": r.available_bps,
             "reservations": [{"app_id": x.app_id, "bps": x.bps} for x in r.reservations]} for r in links]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'link':<24} {'status':<8} {'rate b/s':>10} {'held b/s':>10} {'free b/s':>10}  applications")
    for r in rows:
        apps = ", ".join(f"{x['app_id'][:8]}:{x['bps']:.0f}" for x in r["reservations"])
        click.echo(f"{r['a'] + ' - ' + r['b']:<24} {r['status']:<8} {r['capacity_bps']:>10.0f} {r['reserved_bps']:>10.0f} "
                   f"{r['available_bps']:>10.0f}  {apps}")


@topo.command("alarms")
@lab_name_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@lab_dir_option
def topo_alarms(lab_name: str | None, as_json: bool, lab_dir: str | None) -> None:
    """What is wrong in the network now (nodes disconnected, links down, applications degraded), most severe first."""
    import datetime as dt
    import json

    from sdqkd.controller.northbound import sdqkd_pb2 as pb

    lab = _find_lab(lab_name, lab_dir)
    alarms = _controller_call(lab, "ListAlarms", pb.ListAlarmsRequest()).alarms
    rows = [{"severity": pb.Alarm.Severity.Name(a.severity), "kind": a.kind, "resource": a.resource,
             "since": dt.datetime.fromtimestamp(a.since.ToNanoseconds() / 1e9, dt.timezone.utc).isoformat(timespec="seconds"),
             "text": a.text} for a in alarms]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no alarms")
    for r in rows:
        click.echo(f"{r['severity']:<8} {r['since']}  {r['kind']:<22} {r['text']}")


@main.group()
def key() -> None:
    """Keys from a running lab, as an application gets them (ETSI 014)."""


@key.command("get")
@click.option("--from", "src", required=True, help="Master: a node name (its first SAE) or an SAE ID.")
@click.option("--to", "dst", required=True, help="Slave: a node name or an SAE ID.")
@lab_name_option
@click.option("--size", default=256, show_default=True, help="Key size in bits.")
@click.option("--show-key", is_flag=True, help="Print the key itself (base64), not only its fingerprint.")
@click.option("--wait", default=60.0, show_default=True, type=click.FloatRange(0, 600),
              help="Seconds to keep retrying while the KME has no key path yet (503: the controller is asked).")
@lab_dir_option
def key_get(src: str, dst: str, lab_name: str | None, size: int, show_key: bool, wait: float, lab_dir: str | None) -> None:
    """Get one key at SRC's KME for DST's SAE, and the same key at DST's KME by its ID."""
    import base64

    from sdqkd.keysource import KeySourceError
    from sdqkd.lab import keys

    lab = _find_lab(lab_name, lab_dir)
    try:
        res = keys.get(lab, src, dst, size=size, wait=wait)
    except KeySourceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"key_ID      {res.key_id}")
    click.echo(f"master SAE  {res.master_sae}  slave SAE {res.slave_sae}")
    click.echo(f"sha256      {res.fingerprint}...  (identical at both ends)")
    if show_key:
        click.echo(f"key         {base64.b64encode(res.key).decode()}")
    click.echo(f"took        {res.seconds:.2f} s, {res.attempts} request(s) at the master's KME")


@lab.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def lab_check(file: str) -> None:
    """Validate a lab topology file (YANG types, then semantic checks); starts nothing."""
    from sdqkd.lab import topology

    try:
        data = topology.load(file)
        problems = topology.check(data)
    except topology.TopologyError as exc:
        problems = exc.problems
    if problems:
        _topology_problems(file, problems)
    click.echo(f"OK: {topology.summary(data)}")


@main.group()
def tls() -> None:
    """QKD-keyed TLS 1.3: sessions whose PSK is a new QKD key each time (ETSI 014 or the one-call key API)."""


def _tls_options(peer_help: str):  # type: ignore[no-untyped-def]
    """Where this SAE takes its keys: a running lab, or a KME URL and SAE credentials."""
    opts = [
        lab_name_option,
        lab_dir_option,
        click.option("--node", default=None, help="This SAE: a lab node name (its first SAE) or an SAE ID."),
        click.option("--kme", default=None, help="Without a lab: this SAE's KME, https://host:port."),
        click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Without a lab: SAE certificate (PEM)."),
        click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Without a lab: its private key (PEM)."),
        click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="Without a lab: the KME's CA (PEM)."),
        click.option("--peer-sae", "peer_saes", multiple=True, help=peer_help),
        click.option("--host", default="127.0.0.1", show_default=True),
        click.option("--via", type=click.Choice(["014", "api"]), default="014", show_default=True,
                     help="Take keys with ETSI 014 (enc_keys/dec_keys) or the node's one-call key API."),
    ]

    def wrap(f):  # type: ignore[no-untyped-def]
        for o in reversed(opts):
            f = o(f)
        return f
    return wrap


def _tls_keys(lab_name: str | None, lab_dir: str | None, node: str | None, peers: tuple[str, ...], kme: str | None,
              cert: str | None, key: str | None, ca: str | None, peer_saes: tuple[str, ...], via: str):  # type: ignore[no-untyped-def]
    from sdqkd import qkdtls

    try:
        if kme:
            if not (cert and key and ca and peer_saes):
                raise click.UsageError("--kme needs --cert, --key, --ca and --peer-sae")
            src = qkdtls.etsi014_keys(kme, cert, key, ca, list(peer_saes))
            return qkdtls.NodeApiKeys(src.client, list(peer_saes)) if via == "api" else src
        if not node:
            raise click.UsageError("give --node (with a lab) or --kme and SAE credentials")
        from sdqkd.lab.keys import sae_keys

        return sae_keys(_find_lab(lab_name, lab_dir), node, list(peers + peer_saes) or None, via=via)
    except qkdtls.KeySourceError as exc:
        raise click.ClickException(str(exc)) from None


@tls.command("serve")
@_tls_options("A master SAE whose keys are accepted (repeatable; with a lab, default: every other node's).")
@click.option("--from", "peers", multiple=True, help="With a lab: a node whose sessions are accepted (repeatable).")
@click.option("--port", default=0, show_default=True, help="TCP port (0: a free one, printed).")
def tls_serve(lab_name, lab_dir, node, kme, cert, key, ca, peer_saes, host, via, peers, port) -> None:  # type: ignore[no-untyped-def]
    """Accept QKD-keyed TLS sessions as the slave SAE and echo what each client sends."""
    import logging

    from sdqkd import qkdtls

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per session is enough
    keys = _tls_keys(lab_name, lab_dir, node, peers, kme, cert, key, ca, peer_saes, via)
    with qkdtls.QkdTlsServer(keys, host, port) as srv:
        click.echo(f"listening on {srv.host}:{srv.port}")
        sys.stdout.flush()
        try:
            srv.serve_forever(qkdtls.echo)
        except KeyboardInterrupt:
            pass


@tls.command("connect")
@_tls_options("Without a lab: the slave SAE the key is for.")
@click.option("--to", "peers", multiple=True, help="With a lab: the server's node (the slave SAE).")
@click.option("--port", required=True, type=int, help="The server's TCP port.")
@click.option("--idle", default=5.0, show_default=True, help="Stop reading after this many seconds without data.")
def tls_connect(lab_name, lab_dir, node, kme, cert, key, ca, peer_saes, host, via, peers, port, idle) -> None:  # type: ignore[no-untyped-def]
    """Open a QKD-keyed TLS session as the master SAE, send stdin, print what comes back."""
    from sdqkd import qkdtls

    if not kme and not peers and not peer_saes:
        raise click.UsageError("give --to (the server's node) or --peer-sae")
    keys = _tls_keys(lab_name, lab_dir, node, peers, kme, cert, key, ca, peer_saes, via)
    data = sys.stdin.buffer.read()
    try:
        with qkdtls.connect(host, port, keys) as sock:
            click.echo(f"session key_ID {sock.key_id}, {sock.version()} {sock.cipher()[0]}", err=True)
            answer = qkdtls.exchange(sock, data, idle=idle)
    except qkdtls.KeySourceError as exc:  # the session's or the key source's
        raise click.ClickException(str(exc)) from None
    sys.stdout.buffer.write(answer)


@main.group()
def channel() -> None:
    """Direct quantum channels through the optical switches (the lab's controller)."""


def _channel_request(message, src: str, dst: str, wavelength: int | None):  # type: ignore[no-untyped-def]
    """SRC/DST as NODE (the controller picks the modules) or NODE:QKDI (these two modules)."""
    from sdqkd.controller.northbound import sdqkd_pb2 as pb

    ends = [e.rpartition(":") for e in (src, dst)]
    extra = {"wavelength": wavelength} if wavelength is not None else {}
    if all(sep and qkdi.isdigit() for _, sep, qkdi in ends):
        (tn, _, ti), (rn, _, ri) = ends
        return message(tx=pb.InterfaceRef(node=tn, qkdi_id=int(ti)), rx=pb.InterfaceRef(node=rn, qkdi_id=int(ri)), **extra)
    if any(sep for _, sep, _ in ends):
        raise click.UsageError("give two nodes, or two NODE:QKDI interfaces")
    return message(src=src, dst=dst, **extra)


def _channel_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--wavelength", type=int, default=None, help="DWDM channel to use (default: the controller picks).")(f)
    f = lab_name_option(f)
    f = lab_dir_option(f)
    f = click.argument("dst")(f)
    return click.argument("src")(f)


@channel.command("compute")
@_channel_options
@click.option("--max", "max_alternatives", type=int, default=0, help="At most this many alternatives (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def channel_compute(src: str, dst: str, wavelength: int | None, lab_name: str | None, lab_dir: str | None,
                    max_alternatives: int, as_json: bool) -> None:
    """Dry run: the ways to make a channel SRC -> DST (route, wavelength, loss, expected key rate); changes nothing."""
    import json

    from sdqkd.controller.northbound import sdqkd_pb2 as pb

    lab = _find_lab(lab_name, lab_dir)
    req = _channel_request(pb.ComputeChannelRequest, src, dst, wavelength)
    req.max_alternatives = max_alternatives
    options = _controller_call(lab, "ComputeChannel", req).options
    rows = [{"tx": f"{o.tx.node_name}:{o.tx.qkdi_id}", "rx": f"{o.rx.node_name}:{o.rx.qkdi_id}",
             "channel": o.channel if o.HasField("channel") else None, "loss_db": round(o.loss_db, 3),
             "expected_skr": round(o.expected_skr, 1), "busy": o.busy, "fibres": list(o.fibres),
             "hops": [[h.switch, h.port_in, h.port_out] for h in o.hops]} for o in options]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'tx':<14} {'rx':<14} {'ch':>4} {'loss dB':>8} {'rate b/s':>10}  route")
    for r in rows:
        ch = "-" if r["channel"] is None else str(r["channel"])
        route = " > ".join(r["fibres"]) + ("  (busy)" if r["busy"] else "")
        click.echo(f"{r['tx']:<14} {r['rx']:<14} {ch:>4} {r['loss_db']:>8.2f} {r['expected_skr']:>10.0f}  {route}")


@channel.command("create")
@_channel_options
def channel_create(src: str, dst: str, wavelength: int | None, lab_name: str | None, lab_dir: str | None) -> None:
    """Set up a channel SRC -> DST: cross-connects on the way and a PHYS link at both ends."""
    from sdqkd.controller.northbound import sdqkd_pb2 as pb

    lab = _find_lab(lab_name, lab_dir)
    ch = _controller_call(lab, "CreateChannel", _channel_request(pb.CreateChannelRequest, src, dst, wavelength), timeout=60)
    wl = f"ch {ch.channel}" if ch.HasField("channel") else "O-band"
    click.echo(f"{ch.chan_id} {ch.tx.node_name}:{ch.tx.qkdi_id} -> {ch.rx.node_name}:{ch.rx.qkdi_id} {wl} "
               f"{ch.loss_db:.2f} dB over {', '.join(ch.fibres)}")
