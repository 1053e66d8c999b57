"""`python -m sdqkd.agents --config FILE`: one node's agent, as `sdqkd agent` runs it.

A separate entry point so that an agent process loads nothing it does not run: the CLI
(click, the lab and controller commands) costs an idle agent ~1.3 MB of its memory
budget (bench/labscale.py), and the lab starts tens of agents."""
from __future__ import annotations

import argparse
import sys

from sdqkd.agents.main import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdqkd.agents", description=run.__doc__)
    ap.add_argument("--config", required=True, help="Agent config (JSON).")
    return run(ap.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
