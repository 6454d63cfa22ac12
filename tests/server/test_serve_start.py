"""`facetrt serve` that cannot start says why in one line (exit 2), like every other command,
instead of a traceback of exception groups."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from facetrt import cli
from facetrt.storage import DataDirLock

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _serve(data_dir: Path, listen: str, http: str) -> list[str]:
    return ["serve", "--data-dir", str(data_dir), "--listen", listen, "--http", http]


@pytest.mark.parametrize(("surface", "what"), [("protocol", "the protocol"), ("http", "HTTP")])
def test_a_port_in_use_is_one_line(
    tmp_path: Path,
    taken_port: int,
    capsys: pytest.CaptureFixture[str],
    surface: str,
    what: str,
) -> None:
    taken, free = f"127.0.0.1:{taken_port}", "127.0.0.1:0"
    argv = _serve(tmp_path, taken, free) if surface == "protocol" else _serve(tmp_path, free, taken)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"facetrt: bad_request: cannot listen for {what} on {taken}: Address already in use"
    )


def test_a_data_directory_in_use_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = DataDirLock(tmp_path)
    try:
        assert cli.main(_serve(tmp_path, "127.0.0.1:0", "127.0.0.1:0")) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip()
    assert err.startswith("facetrt: bad_request: data directory")
    assert err.endswith("is in use by another process")
    assert "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`facetrt ... | head`: the pipe closes before the command has written everything; that is
    exit 141 (128 + SIGPIPE) without a traceback, not a BrokenPipeError dump."""
    config = tmp_path / "facetrt.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n')
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "facetrt", "config", "check", str(config)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            check=False,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr.decode() == ""
