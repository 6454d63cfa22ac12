"""The example facets behave as documented, and the example program runs."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from facetrt import BadRequestError
from facetrt.examples import STATS_AGENT

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime

TENANT = "acme"


async def test_agent_memory_appends_lists_and_summarises(rt: Runtime) -> None:
    for index, role in enumerate(["user", "assistant", "user", "tool"]):
        seq = await rt.call(TENANT, "m", "append_turn", role, f"t{index}", index, cls="AgentMemory")
        assert seq == index
    last = await rt.call(TENANT, "m", "last", 2)
    assert last == [
        {"role": "user", "text": "t2", "tokens": 2},
        {"role": "tool", "text": "t3", "tokens": 3},
    ]
    summary = await rt.call(TENANT, "m", "summary")
    assert summary == {"turns": 4, "by_role": {"assistant": 1, "tool": 1, "user": 2}, "tokens": 6}
    # Every turn was also counted by another facet of the tenant.
    assert await rt.call(TENANT, STATS_AGENT, "get") == 4
    assert await rt.call(TENANT, "m", "forget", 1) == 3
    assert await rt.call(TENANT, "m", "last", 10) == [{"role": "tool", "text": "t3", "tokens": 3}]


async def test_agent_memory_rejects_bad_roles_without_writing(rt: Runtime) -> None:
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "m", "append_turn", "wizard", "hi", cls="AgentMemory")
    assert await rt.call(TENANT, "m", "summary") == {"turns": 0, "by_role": {}, "tokens": 0}


@pytest.mark.slow
def test_example_program_runs_and_state_persists(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "facetrt.examples", str(tmp_path), "--conversations", "4"]
    command += ["--turns", "5"]
    first = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert "turns recorded tenant-wide (all runs): 20" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert "turns recorded tenant-wide (all runs): 40" in second.stdout
