"""``facetrt serve`` in a child process, optionally under ``fiu-run``, with fault controls.

Under ``fiu-run -x`` the daemon has libfiu's POSIX preload library: every call to ``fsync``,
``fdatasync``, ``pwrite``, ``writev`` (and more) goes through a failure point that
:meth:`FaultDaemon.enable` turns on at run time through ``fiu-ctrl`` (named pipes
``<root>/fiu-<pid>.in/.out``), always, once (``onetime``) or with a probability, failing with
``EIO``. A failure point fails the call without making it, as a disk that refuses a write or a
flush would; it covers every thread and every file of the process (facet stores, the system
store, the timer index, directory fsyncs).

Which code issues which call (LMDB 0.9 as bundled by py-lmdb, ``writemap=False``):

- a commit writes its dirty pages with ``pwrite`` (one page) or ``lseek`` + ``writev`` (a run
  of adjacent pages), then ``fdatasync`` (data file), then the meta page with ``pwrite`` on a
  second, ``O_DSYNC`` descriptor. A failure before the meta page aborts the transaction and
  leaves the environment usable; a failed meta page write also marks the environment fatal
  (``MDB_PANIC`` on every later transaction) until it is closed and opened again.
- ``fsync`` is not used by LMDB commits here; facetrt calls it for directories when a store is
  created (and for backups, imports, the admin key file).

The daemon's own sockets and logs use ``send`` and ``write``, which are left alone.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Final

import httpx

from facetrt.storage import SystemStore
from tests.util import terminate

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TENANT: Final = "faults"
HOST: Final = "127.0.0.1"
START_SECONDS: Final = 60.0
STOP_SECONDS: Final = 60.0
SERVING: Final = re.compile(r"protocol tcp://127\.0\.0\.1:(\d+), HTTP http://127\.0\.0\.1:(\d+)")

# libfiu's names for the calls issue 5 asks to fail (``fiu-ls`` lists them).
FAULT_POINTS: Final = {
    "fdatasync": "posix/io/sync/fdatasync",
    "fsync": "posix/io/sync/fsync",
    "pwrite": "posix/io/rw/pwrite",
    "writev": "posix/io/rw/writev",
}

CONFIG_TEMPLATE: Final = """data_dir = {data_dir!r}

[classes]
Counter = "facetrt.examples:Counter"
Register = "tests.facets:Register"
Alarm = "tests.facets:Alarm"

[runtime]
# Few writer threads: the test machine is small, and fewer threads keep runs comparable.
commit_threads = 4
"""


def fiu_available() -> bool:
    """Whether ``fiu-run`` and ``fiu-ctrl`` (Debian ``fiu-utils``) are installed."""
    return shutil.which("fiu-run") is not None and shutil.which("fiu-ctrl") is not None


class FaultDaemonError(RuntimeError):
    """The daemon did not start, or a fault could not be set."""


def _child_environment() -> dict[str, str]:
    # FACETRT_* variables would be read as daemon settings; the repository root on the path
    # lets the daemon import tests.facets.
    env = {name: value for name, value in os.environ.items() if not name.startswith("FACETRT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _copy_log(source: IO[bytes], path: Path) -> None:
    """Copy the daemon's stderr to ``path`` as it comes, until the daemon closes it."""
    with source, path.open("wb") as target:
        while chunk := os.read(source.fileno(), 65536):
            target.write(chunk)
            target.flush()


class FaultDaemon:
    """``facetrt serve`` on ``data_dir`` (default ``root/data``); logs and pipes in ``root``.

    The tenant :data:`TENANT` and its key are created before the first start (the daemon is
    not running yet, so the system store is opened here directly).
    """

    def __init__(self, root: Path, *, data_dir: Path | None = None, fiu: bool = True) -> None:
        self.root = root
        self.data_dir = data_dir or root / "data"
        self.fiu = fiu
        root.mkdir(parents=True, exist_ok=True)
        key_file = root / "tenant.key"
        if key_file.exists():
            self.key = key_file.read_text().strip()
        else:
            system = SystemStore(self.data_dir / "system")
            try:
                system.create_tenant(TENANT)
                _, self.key = system.create_key(TENANT)
            finally:
                system.close()
            key_file.write_text(self.key + "\n")
        self.config = root / "daemon.toml"
        self.config.write_text(CONFIG_TEMPLATE.format(data_dir=str(self.data_dir)))
        self.starts = 0
        self.tcp_port = 0
        self.http_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_copier = threading.Thread()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"tcp://{HOST}:{self.tcp_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    @property
    def stderr_path(self) -> Path:
        return self.root / f"daemon-{self.starts}.err"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start and wait until it serves (blocking). Raises FaultDaemonError."""
        assert self.process is None
        self.starts += 1
        out = self.root / f"daemon-{self.starts}.out"
        command = [sys.executable, "-m", "facetrt", "--log-level", "WARNING", "serve"]
        command += ["--config", str(self.config), "--listen", f"{HOST}:0", "--http", f"{HOST}:0"]
        if self.fiu:
            # fiu-run execs the program: the daemon keeps fiu-run's pid, which names the pipes.
            command = ["fiu-run", "-x", "-f", str(self.root / "fiu"), *command]
        with out.open("wb") as stdout:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,  # through a pipe: a file size limit does not apply
                env=_child_environment(),
                cwd=REPO_ROOT,
            )
        assert self.process.stderr is not None
        self._log_copier = threading.Thread(
            target=_copy_log, args=(self.process.stderr, self.stderr_path), daemon=True
        )
        self._log_copier.start()
        deadline = time.monotonic() + START_SECONDS
        while (match := SERVING.search(out.read_text())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FaultDaemonError(
                    f"the daemon did not start: {self.stderr_text()[-2000:]} (see {out})"
                )
            time.sleep(0.02)
        self.tcp_port, self.http_port = int(match[1]), int(match[2])

    def stop(self) -> int:
        """SIGTERM (drain, flush, close), SIGKILL if that takes too long; the exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        terminate(process, STOP_SECONDS)
        self._log_copier.join(STOP_SECONDS)  # the pipe ends with the process
        return process.returncode

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- faults ------------------------------------------------------------------------------

    def control(self, *commands: str) -> None:
        """Send libfiu remote-control commands to the running daemon (through ``fiu-ctrl``).

        Raises:
            FaultDaemonError: fiu-ctrl refused a command.
        """
        assert self.fiu, "the daemon does not run under fiu-run"
        command = ["fiu-ctrl", "-f", str(self.root / "fiu")]
        for text in commands:
            command += ["-c", text]
        command.append(str(self.pid))
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        # fiu-ctrl exits 0 and prints a line when the program answered -1 or is unknown.
        if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
            raise FaultDaemonError(f"fiu-ctrl {commands}: {result.stdout} {result.stderr}")

    def enable(self, kind: str, *, probability: float | None = None, once: bool = False) -> None:
        """Make ``kind`` (a key of :data:`FAULT_POINTS`) fail with EIO: always, once, or with
        ``probability`` per call."""
        parameters = f"name={FAULT_POINTS[kind]},failinfo={errno.EIO}"
        if once:
            parameters += ",onetime"
        if probability is None:
            self.control(f"enable {parameters}")
        else:
            self.control(f"enable_random {parameters},probability={probability}")

    def disable(self, *kinds: str) -> None:
        self.control(*(f"disable name={FAULT_POINTS[kind]}" for kind in kinds))

    def limit_file_size(self, limit: int | None) -> None:
        """Set the daemon's RLIMIT_FSIZE soft limit (None: unlimited). Writes past it fail
        with EFBIG (Python ignores SIGXFSZ, so the process is not killed)."""
        soft = resource.RLIM_INFINITY if limit is None else limit
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))

    # -- HTTP --------------------------------------------------------------------------------

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, timeout=30.0)

    async def metric(self, http: httpx.AsyncClient, name: str) -> float:
        """The value of the unlabelled metric ``name`` from ``/metrics``."""
        response = await http.get("/metrics")
        response.raise_for_status()
        for line in response.text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)
