"""Run one node's agent until SIGTERM/SIGINT: the process around agents.agent.Agent
(umask, config, logging, the C library's allocator settings, the ready line `lab up`
waits for, exit codes)."""
from __future__ import annotations

import ctypes
import logging
import signal
import sys

from sdqkd import private
from sdqkd.listen import ListenError

EXIT_CONFIG = 2
EXIT_LISTEN = 3  # as sdqkd/cli.py: `lab up` reads it as "a port is in use"
_M_ARENA_MAX = -8  # glibc mallopt parameter


def one_malloc_arena() -> None:
    """One glibc malloc arena for the whole process. By default each thread that
    allocates gets an arena of its own (up to 8 per core), each keeping its freed blocks
    resident; the agent's ~16 threads mostly wait, and Python allocates under the GIL
    anyway, so one arena costs no parallelism and saves ~1.2 MB of an idle agent
    (bench/labscale.py). Before any thread starts; a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def run(config_path: str) -> int:
    """Run one SD-QKD node agent (NETCONF server, drivers, LKMS) until SIGTERM/SIGINT."""
    from sdqkd.agents import config as agent_config
    from sdqkd.agents.agent import Agent
    from sdqkd.agents.netconf.ssh import return_large_blocks_to_the_os

    one_malloc_arena()
    private.private_process(config_path)
    try:
        cfg = agent_config.load(config_path)
    except agent_config.ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return_large_blocks_to_the_os()  # a password check's 16 MiB goes back after each login
    node = None
    try:
        node = Agent(cfg)
        node.start()
    except ListenError as exc:  # one line for the operator (and `lab up`), no traceback
        if node is not None:
            node.stop()
        print(f"error: agent {cfg.node.name}: {exc}", file=sys.stderr)
        return EXIT_LISTEN
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.stop())
    print(f"ready netconf={cfg.netconf.address}:{node.server.port}", file=sys.stderr, flush=True)
    node.wait()
    return 0
