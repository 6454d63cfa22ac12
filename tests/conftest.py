"""Shared fixtures: a temporary data directory and a runtime hosting the test facets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from facetrt import Runtime, RuntimeConfig, open_runtime
from tests.facets import CLASSES

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def config() -> RuntimeConfig:
    """Small limits so tests reach them; commit threads kept few to spare the 2-core machine."""
    return RuntimeConfig(mailbox_envelopes_max=64, open_facets_max=8, commit_threads=4)


@pytest.fixture
async def rt(data_dir: Path, config: RuntimeConfig) -> AsyncIterator[Runtime]:
    async with open_runtime(data_dir, classes=CLASSES, config=config) as runtime:
        yield runtime
