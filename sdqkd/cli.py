"""The `sdqkd` command: one entry point for operators, the lab and CI."""
from __future__ import annotations

import subprocess
import sys

import click

from sdqkd import __version__, yangmodels


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdqkd")
def main() -> None:
    """Software-defined QKD network: agents, controller and lab."""


@main.group()
def yang() -> None:
    """The YANG modules in yang/ and the bindings made from them."""


@yang.command("bindings")
@click.option("--check", is_flag=True, help="Only report drift between bindings/ and yang/.")
def yang_bindings(check: bool) -> None:
    """Regenerate bindings/ with pyangbind (or check it is up to date)."""
    if check:
        problems = yangmodels.drift()
        for p in problems:
            click.echo(p, err=True)
        if problems:
            raise click.ClickException("bindings/ differs from what yang/ generates: run `make bindings`")
        click.echo("bindings/ is up to date")
        return
    for name in yangmodels.generate():
        click.echo(f"wrote bindings/{name}")


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

    if check:
        problems = codegen.drift()
        for p in problems:
            click.echo(p, err=True)
        if problems:
            raise click.ClickException("generated gRPC code is stale: run `sdqkd proto`")
        click.echo("generated gRPC code is up to date")
        return
    for name in codegen.generate():
        click.echo(f"wrote {name}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Agent config (JSON).")
def agent(config_path: str) -> None:
    """Run one SD-QKD node agent (NETCONF server, drivers) until SIGTERM/SIGINT."""
    import logging
    import signal

    from sdqkd.agents import config as agent_config
    from sdqkd.agents.agent import Agent

    try:
        cfg = agent_config.load(config_path)
    except agent_config.ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"config error: {problem}", err=True)
        raise SystemExit(2) from None
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = Agent(cfg)
    node.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.stop())
    click.echo(f"ready netconf={cfg.netconf.address}:{node.server.port}", err=True)
    node.wait()


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Controller config (JSON).")
def controller(config_path: str) -> None:
    """Run the SDN controller (southbound NETCONF, path computation, gRPC northbound)."""
    import logging
    import signal
    import threading

    from sdqkd.agents.config import ConfigError
    from sdqkd.controller import config as controller_config
    from sdqkd.controller.service import serve

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
    serve(cfg, stop)


@main.group()
def lab() -> None:
    """Emulated QKD networks on loopback."""


@lab.command("up")
@click.argument("topology", required=False)
def lab_up(topology: str | None) -> None:
    """Bring up a lab from a topology file."""
    raise click.ClickException("`sdqkd lab up` is not yet implemented (issue: Lab)")


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
        for p in problems:
            click.echo(f"{file}: {p}", err=True)
        sys.exit(1)
    click.echo(f"OK: {topology.summary(data)}")
