"""Fixtures of the agent tests: one real agent process per test module, and a NETCONF
session to it (ncclient) per test."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentproc import AgentProc, agent_config


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    a = agent_config(tmp_path_factory.mktemp("agent")).start()
    yield a
    a.stop()


@pytest.fixture
def nc(agent: AgentProc) -> Iterator[Any]:
    m = agent.connect()
    yield m
    if m.connected:
        m.close_session()
