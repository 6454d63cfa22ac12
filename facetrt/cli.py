"""The `facetrt` command: the daemon and its management commands.

Management commands act through the running daemon's admin API (``--url``, the admin key read
from ``<data dir>/admin.key``) and, where no daemon holds the data directory, directly on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from ._errors import ERROR_CLASSES, ConfigError, ConflictError, ErrorCode, FacetrtError
from .config import load_daemon_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from .data import DataOperations
    from .storage import SystemStore

DEFAULT_URL = "http://127.0.0.1:7421"
DEFAULT_DATA_DIR = Path("facetrt-data")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(options: argparse.Namespace) -> int:
    from .server._daemon import Daemon

    overrides = {
        "data_dir": options.data_dir,
        "server.listen": options.listen,
        "server.http": options.http,
    }
    path = options.config or (
        Path(os.environ["FACETRT_CONFIG"]) if os.environ.get("FACETRT_CONFIG") else None
    )
    config = load_daemon_config(path, environ=os.environ, overrides=overrides)
    daemon = Daemon(config, tune_gc=True)  # this process is the daemon's

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: daemon.run(handle_signals=True, task_status=task_status)
            )
            http = (
                f"http://{info.http_address[0]}:{info.http_address[1]}"
                if info.http_address
                else "off"
            )
            _out(
                f"facetrt serving: protocol tcp://{info.tcp_address[0]}:{info.tcp_address[1]}, "
                f"HTTP {http}"
            )
            _out(f"data directory {info.data_dir.resolve()}; admin key in {info.admin_key_path}")
            if info.proxy_address:
                host, port = info.proxy_address
                _out(f"egress proxy on {host}:{port} (per-run credentials only)")

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # A daemon that cannot start (data directory in use, a port taken) fails inside its
        # nursery: one line for the operator, as every other command's errors, not a traceback.
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], FacetrtError):
            raise leaves[0] from None
        raise
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def cmd_config_check(options: argparse.Namespace) -> int:
    # The environment applies as it would to `serve`, so this shows what would run.
    config = load_daemon_config(options.file, environ=os.environ)
    from .server._daemon import resolve_classes

    resolve_classes(config.classes)
    _out(f"{options.file}: ok")
    _out(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


# -- management: direct or through the daemon ----------------------------------------------


class _Admin:
    """Runs a management operation on the data directory, or through the daemon's admin API."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.data_dir = Path(options.data_dir or DEFAULT_DATA_DIR)
        # An explicit --url names the daemon to act through: never fall back to a local data
        # directory that no daemon holds (it may not even be this node's, or exist yet).
        self.remote = options.url is not None
        self.url = (options.url or DEFAULT_URL).rstrip("/")
        self.key_file = Path(options.admin_key_file or self.data_dir / "admin.key")

    def run(
        self,
        direct: Callable[[SystemStore], Any],
        method: str,
        path: str,
        body: dict[str, object] | None = None,
        *,
        existing: bool = False,
    ) -> Any:
        """``direct(system)`` on the data directory, or one admin request when a daemon holds it."""
        return self.run_system(direct, lambda: self._http(method, path, body), existing=existing)

    def run_system(
        self,
        direct: Callable[[SystemStore], Any],
        through_daemon: Callable[[], Any],
        *,
        existing: bool = False,
    ) -> Any:
        """``direct(system)`` on the data directory, or ``through_daemon()`` when a daemon
        holds it (operations that take more than one request) or ``--url`` was given.

        Args:
            existing: act directly only on a data directory that already has a system store
                (never create one: for operations that write files an operator relies on).
        """
        from .storage import DataDirLock, SystemStore

        if self.remote:
            return through_daemon()
        if existing and not (self.data_dir / "system" / "data.mdb").is_file():
            raise ConfigError(
                f"no facetrt data directory at {str(self.data_dir)!r} (no system store): give "
                "--data-dir of the node, or --url of its running daemon"
            )
        try:
            lock = DataDirLock(self.data_dir)
        except ConfigError:
            return through_daemon()  # a daemon holds the directory
        try:
            system = SystemStore(self.data_dir / "system")
            try:
                return direct(system)
            finally:
                system.close()
        finally:
            lock.release()

    def _http(self, method: str, path: str, body: dict[str, object] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        with self.open(method, path, data) as response:
            return json.loads(response.read() or b"null")

    def open(
        self,
        method: str,
        path: str,
        data: bytes | BinaryIO | None = None,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Any:
        """Send one admin request; the response (a file) or the error it carries, raised."""
        try:
            key = self.key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin key {str(self.key_file)!r}: {exc}") from exc
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": content_type,
                "Accept": accept,
            },
        )
        try:
            # No read timeout for data operations: a backup or a large export takes long.
            timeout = 30 if data is None and accept == "application/json" else None
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            error = json.loads(exc.read() or b"{}").get("error", {})
            code = ErrorCode(error.get("code", "internal"))
            raise ERROR_CLASSES[code](error.get("message", str(exc))) from None
        except urllib.error.URLError as exc:
            raise ConfigError(f"cannot reach the daemon at {self.url}: {exc.reason}") from None

    def run_data(
        self, direct: Callable[[DataOperations], Awaitable[Any]], through_daemon: Callable[[], Any]
    ) -> Any:
        """Run a data operation directly on the data directory, or through the daemon."""
        from .storage import DataDirLock

        if self.remote:
            return through_daemon()
        try:
            DataDirLock(self.data_dir).release()
        except ConfigError:
            return through_daemon()  # a daemon holds the directory
        result = trio.run(self._direct_data, direct)
        if isinstance(result, FacetrtError):
            raise result
        return result

    async def _direct_data(self, direct: Callable[[DataOperations], Awaitable[Any]]) -> Any:
        from .config import RuntimeConfig
        from .data import DataOperations
        from .runtime import open_runtime
        from .storage import SystemStore

        config = RuntimeConfig(commit_threads=4)
        async with open_runtime(self.data_dir, classes={}, config=config) as runtime:
            system = SystemStore(self.data_dir / "system")
            try:
                operations = DataOperations(
                    runtime, system=system, check_classes=False, offline=True
                )
                await operations.start()
                # Returned, not raised: the runtime's nursery would wrap it in a group.
                try:
                    return await direct(operations)
                except FacetrtError as exc:
                    return exc
            finally:
                system.close()


def cmd_tenant_create(options: argparse.Namespace) -> int:
    def direct(system: SystemStore) -> dict[str, str]:
        from .data import refuse_leftover_tenant_data
        from .storage import tenant_path

        data_dir = Path(options.data_dir or DEFAULT_DATA_DIR)
        refuse_leftover_tenant_data(tenant_path(data_dir, options.name), options.name)
        key_id, key = system.create_tenant_with_key(options.name)
        return {"tenant": options.name, "key_id": key_id, "key": key}

    result = _Admin(options).run(direct, "POST", "/v1/admin/tenants", {"tenant": options.name})
    _out(f"created tenant {result['tenant']} with key id {result['key_id']}")
    _out("its key (shown only this once; store it safely):")
    _out(result["key"])
    return 0


def cmd_tenant_list(options: argparse.Namespace) -> int:
    result = _Admin(options).run(
        lambda system: {"tenants": system.list_tenants(), "quotas": system.all_tenant_quotas()},
        "GET",
        "/v1/admin/tenants",
    )
    if not options.quotas:
        for tenant in result["tenants"]:
            _out(tenant)  # one per line: scripts read this
        return 0
    overrides: dict[str, dict[str, object]] = result.get("quotas", {})
    _out(f"{'TENANT':<24} QUOTAS (overrides of the node defaults)")
    for tenant in result["tenants"]:
        _out(f"{tenant:<24} {_describe_overrides(overrides.get(tenant, {}))}")
    return 0


QUOTA_FLAGS = {
    "facets": "facets_max",
    "bytes_per_facet": "facet_bytes_max",
    "mailbox": "mailbox_envelopes_max",
    "calls_per_second": "calls_per_second",
    "burst": "calls_burst",
    "in_flight": "calls_in_flight_max",
}


def _describe_overrides(overrides: dict[str, object]) -> str:
    return " ".join(f"{name}={_number(value)}" for name, value in overrides.items()) or "-"


def _number(value: object) -> str:
    """A quota as typed: 50, not 50.0 (rates are floats once validated)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quota_value(text: str) -> int | float | None:
    """A quota flag's value: a number, or ``default`` to drop the override."""
    if text == "default":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}") from None


def _quota_changes(options: argparse.Namespace) -> dict[str, int | float | None]:
    return {
        field: getattr(options, flag)
        for flag, field in QUOTA_FLAGS.items()
        if getattr(options, flag, _UNSET) is not _UNSET
    }


_UNSET = object()


def cmd_tenant_quota(options: argparse.Namespace) -> int:
    """Show a tenant's quotas, or change the ones given (the others stay as they are)."""
    from .config import TenantQuotaSettings

    admin = _Admin(options)
    tenant = options.name
    path = f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/quotas"
    changes = _quota_changes(options)
    if not changes and not options.reset:
        return _show_tenant(admin, tenant)

    def merged(current: dict[str, object]) -> dict[str, object]:
        settings = {} if options.reset else dict(current)
        settings.update(changes)
        return TenantQuotaSettings.parse(settings).overrides()

    def direct(system: SystemStore) -> dict[str, object]:
        overrides = merged(system.tenant_quotas(tenant))
        system.set_tenant_quotas(tenant, overrides)
        return {"tenant": tenant, "overrides": overrides}

    def through_daemon() -> Any:
        current = admin._http("GET", path, None)["overrides"]
        return admin._http("PUT", path, merged(current))

    result = admin.run_system(direct, through_daemon)
    _out(f"quotas of tenant {tenant}: {_describe_overrides(result['overrides'])}")
    if "quotas" not in result:
        _out("(no daemon running: the daemon applies them when it starts)")
    return 0


def cmd_tenant_show(options: argparse.Namespace) -> int:
    return _show_tenant(_Admin(options), options.name)


def _show_tenant(admin: _Admin, tenant: str) -> int:
    from .storage import count_tenant_facets

    def direct(system: SystemStore) -> dict[str, object]:
        return {
            "tenant": tenant,
            "facets": count_tenant_facets(admin.data_dir, tenant),
            "overrides": system.tenant_quotas(tenant),
        }

    result = admin.run(direct, "GET", f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/quotas")
    overrides: dict[str, object] = result["overrides"]
    effective: dict[str, object] = result.get("quotas") or {}
    _out(f"{'tenant':<22} {tenant}")
    _out(f"{'facets':<22} {result['facets']}")
    for field in QUOTA_FLAGS.values():
        if field in overrides:
            shown = f"{_number(overrides[field])} (set)"
        elif field in effective:
            value = effective[field]
            shown = f"{'unlimited' if value is None else _number(value)} (default)"
        else:
            shown = "(default)"  # no daemon: the node's configuration decides
        _out(f"{field:<22} {shown}")
    return 0


def cmd_tenant_delete(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    path = f"/v1/admin/tenants/{urllib.parse.quote(options.name)}"
    result = admin.run_data(
        lambda ops: ops.delete_tenant(options.name, _progress("deleted", "facets")),
        lambda: _long(admin, "DELETE", path, None, "deleted"),
    )
    _out(
        f"deleted tenant {options.name}: revoked {result['revoked_keys']} keys, "
        f"removed {result['deleted_facets']} facets"
    )
    return 0


def _egress_path(tenant: str) -> str:
    return f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/egress"


def _show_egress(result: dict[str, Any]) -> None:
    source = result["source"]
    _out(f"egress policy of tenant {result['tenant']} ({source}):")
    if result["policy"] is None:
        _out("(the node default from the daemon's [egress] configuration; deny all by default)")
        return
    _out(json.dumps(result["policy"], indent=2))


def cmd_egress_show(options: argparse.Namespace) -> int:
    tenant = options.tenant

    def direct(system: SystemStore) -> dict[str, object]:
        stored = system.tenant_egress(tenant)
        return {"tenant": tenant, "policy": stored, "source": "tenant" if stored else "default"}

    _show_egress(_Admin(options).run(direct, "GET", _egress_path(tenant)))
    return 0


def cmd_egress_set(options: argparse.Namespace) -> int:
    from .policy import EgressPolicy

    tenant = options.tenant
    source = sys.stdin if options.file == "-" else Path(options.file).open()  # noqa: SIM115
    with source:
        try:
            data = json.loads(source.read())
        except ValueError as exc:
            raise ConfigError(f"{options.file}: not JSON: {exc}") from None
    policy = EgressPolicy.parse(data).to_json()  # refuse a bad file before anything changes

    def direct(system: SystemStore) -> dict[str, object]:
        system.set_tenant_egress(tenant, policy)
        return {"tenant": tenant, "policy": policy, "source": "tenant"}

    result = _Admin(options).run(direct, "PUT", _egress_path(tenant), policy)
    _show_egress(result)
    return 0


def cmd_egress_reset(options: argparse.Namespace) -> int:
    tenant = options.tenant

    def direct(system: SystemStore) -> dict[str, object]:
        system.set_tenant_egress(tenant, None)
        return {"tenant": tenant, "policy": None, "source": "default"}

    _show_egress(_Admin(options).run(direct, "DELETE", _egress_path(tenant)))
    return 0


def _secrets_path(tenant: str, name: str | None = None) -> str:
    path = f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/secrets"
    return path if name is None else f"{path}/{urllib.parse.quote(name, safe='')}"


def _read_secret_value() -> str:
    """The value from standard input: typed without echo at a terminal, else piped (one
    trailing newline dropped). Never printed."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("secret value (not shown): ")
    value = sys.stdin.read()
    return value[:-1] if value.endswith("\n") else value


def cmd_secret_set(options: argparse.Namespace) -> int:
    from .policy import NodeKey

    tenant, name = options.tenant, options.name
    value = _read_secret_value().removesuffix("\r")
    admin = _Admin(options)

    def direct(system: SystemStore) -> dict[str, object]:
        key = NodeKey.load_or_create(admin.data_dir, sealed=len(system.secrets()))
        record = key.seal(tenant, name, value, options.host, allow_http=options.allow_http)
        system.put_secret(tenant, name, record)
        return {"name": name, "hosts": record["hosts"], "allow_http": record["allow_http"]}

    body: dict[str, object] = {"value": value, "hosts": options.host}
    if options.allow_http:
        body["allow_http"] = True
    result = admin.run(direct, "PUT", _secrets_path(tenant, name), body)
    hosts = ", ".join(result["hosts"])
    _out(f"set secret {name} of tenant {tenant}, bound to {hosts}")
    return 0


def cmd_secret_list(options: argparse.Namespace) -> int:
    from .policy import secret_listing

    tenant = options.tenant
    result = _Admin(options).run(
        lambda system: {"secrets": secret_listing(system, tenant)}, "GET", _secrets_path(tenant)
    )
    _out(f"{'NAME':<32} {'HTTP':<5} BOUND HOSTS")
    for secret in result["secrets"]:
        http = "yes" if secret["allow_http"] else "no"
        _out(f"{secret['name']:<32} {http:<5} {', '.join(secret['hosts'])}")
    return 0


def cmd_secret_delete(options: argparse.Namespace) -> int:
    tenant, name = options.tenant, options.name
    _Admin(options).run(
        lambda system: system.delete_secret(tenant, name), "DELETE", _secrets_path(tenant, name)
    )
    _out(f"deleted secret {name} of tenant {tenant}")
    return 0


AUDIT_PAGE = 1000
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> float:
    """``--since``: a duration back from now (``90s``, ``30m``, ``1h``, ``7d``) or unix seconds."""
    unit = _DURATION_UNITS.get(text[-1:])
    try:
        if unit is not None:
            return time.time() - float(text[:-1]) * unit
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since takes a duration such as 1h, 30m, 7d, or unix seconds; got {text!r}"
        ) from None


def cmd_audit(options: argparse.Namespace) -> int:
    """Show a tenant's egress audit log (a table, or JSON lines with --json)."""
    from .policy._audit import read_offline

    admin = _Admin(options)
    tenant = options.tenant
    since: float | None = options.since
    shown = 0
    after: str | None = None
    if not options.json:
        _out(
            f"{'TIME (UTC)':<19} {'SOURCE':<6} {'AGENT':<16} {'METHOD':<7} {'URL':<40} "
            f"{'DECISION':<8} {'RULE':<22} {'STATUS':>6} {'IN':>9} {'OUT':>9} {'MS':>7} ERROR"
        )
    while shown < options.limit:
        page = min(AUDIT_PAGE, options.limit - shown)
        query = urllib.parse.urlencode(
            {k: v for k, v in (("since", since), ("after", after), ("limit", page)) if v}
        )

        def direct(system: SystemStore, page: int = page, after: str | None = after) -> Any:
            records, cursor = read_offline(
                admin.data_dir, tenant, since=since, after=after, limit=page
            )
            return {"records": records, "next": cursor}

        path = f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/audit?{query}"
        result = admin.run(direct, "GET", path)
        for record in result["records"]:
            _out(json.dumps(record, separators=(",", ":")) if options.json else _audit_row(record))
        shown += len(result["records"])
        after = result["next"]
        if after is None:
            break
    return 0


def _audit_row(record: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["time"]))
    port = record["port"]
    default = {"http": 80, "https": 443}.get(record["scheme"])
    url = f"{record['scheme']}://{record['host']}{'' if port == default else f':{port}'}"
    url += record["path"]
    latency = record.get("latency_seconds")
    status = record.get("status")
    return (
        f"{when:<19} {record['source']:<6} {(record.get('agent') or '-')[:16]:<16} "
        f"{record['method'][:7]:<7} {url[:40]:<40} {record['decision']:<8} "
        f"{record['rule'][:22]:<22} {'-' if status is None else status:>6} "
        f"{record.get('bytes_in', 0):>9} {record.get('bytes_out', 0):>9} "
        f"{'-' if latency is None else round(latency * 1000):>7} {record.get('error') or ''}"
    )


def cmd_key_create(options: argparse.Namespace) -> int:
    def direct(system: SystemStore) -> dict[str, str]:
        key_id, key = system.create_key(options.tenant)
        return {"key_id": key_id, "key": key}

    result = _Admin(options).run(
        direct, "POST", f"/v1/admin/tenants/{urllib.parse.quote(options.tenant)}/keys", {}
    )
    _out(f"created key id {result['key_id']} for tenant {options.tenant}")
    _out("the key (shown only this once):")
    _out(result["key"])
    return 0


def cmd_key_list(options: argparse.Namespace) -> int:
    def direct(system: SystemStore) -> list[dict[str, object]]:
        return [
            {"key_id": r.key_id, "tenant": r.tenant, "created": r.created, "revoked": r.revoked}
            for r in system.list_keys(options.tenant)
        ]

    rows = _Admin(options).run(
        direct, "GET", f"/v1/admin/tenants/{urllib.parse.quote(options.tenant)}/keys"
    )
    rows = rows["keys"] if isinstance(rows, dict) else rows
    _out(f"{'KEY ID':<18} {'STATE':<8}")
    for row in rows:
        _out(f"{row['key_id']:<18} {'revoked' if row['revoked'] else 'active':<8}")
    return 0


def cmd_key_revoke(options: argparse.Namespace) -> int:
    admin = _Admin(options)

    def direct(system: SystemStore) -> dict[str, object]:
        # Allowed here even for the last admin key (the daemon refuses that): with the data
        # directory in hand, the operator is not locked out, and the next start writes a new
        # admin key (ensure_admin_key finds none active).
        system.revoke_key(options.key_id)
        admin_keys = [r for r in system.list_keys() if r.is_admin and r.revoked is None]
        return {"key_id": options.key_id, "revoked": True, "admin_keys_active": len(admin_keys)}

    result = admin.run(direct, "DELETE", f"/v1/admin/keys/{urllib.parse.quote(options.key_id)}")
    _out(f"revoked key {options.key_id}")
    if result.get("admin_keys_active") == 0:
        _out(
            "no admin key is active now: the daemon writes a new one to "
            f"{admin.data_dir / 'admin.key'} when it next starts (or run `facetrt key "
            "rotate-admin` now)"
        )
    return 0


def cmd_key_rotate_admin(options: argparse.Namespace) -> int:
    """Replace the admin key: a new one in the admin key file, then every other one revoked."""
    from .server._admin_key import rotate_admin_key

    admin = _Admin(options)

    def direct(system: SystemStore) -> dict[str, object]:
        rotation = rotate_admin_key(system, admin.key_file)
        return {
            "path": str(rotation.path.absolute()),
            "key_id": rotation.key_id,
            "revoked_key_ids": list(rotation.revoked_key_ids),
        }

    # existing: on a directory without a node (a typo, or a workstation that meant --url),
    # acting directly would mint a key for a new, empty node and overwrite the key file.
    result = admin.run(direct, "POST", "/v1/admin/admin-key/rotate", {}, existing=True)
    path = Path(result["path"])
    _out(f"wrote a new admin key (key id {result['key_id']}) to {path} (mode 0600)")
    revoked: list[str] = result["revoked_key_ids"]
    _out(
        f"revoked admin keys: {', '.join(revoked)}" if revoked else "no other admin key was active"
    )
    if not _same_file(path, admin.key_file):
        # Through the daemon, it writes the admin key file of its own data directory.
        _err(
            f"note: {admin.key_file} still holds the old, now revoked admin key; the new one "
            f"is in {path}"
        )
    return 0


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.samefile(second)
    except OSError:
        return False


def _facet_path(verb: str, tenant: str, agent: str) -> str:
    return f"/v1/admin/tenants/{urllib.parse.quote(tenant)}/{verb}/{urllib.parse.quote(agent)}"


def _progress(verb: str, unit: str) -> Callable[[int, int | None], None]:
    def show(done: int, total: int | None) -> None:
        _err(f"{verb} {done}{'' if total is None else f'/{total}'} {unit}")

    return show


def _long(admin: _Admin, method: str, path: str, body: dict[str, object] | None, verb: str) -> Any:
    """A long admin operation: print its progress lines to stderr, return its result."""
    data = None if body is None else json.dumps(body).encode()
    show = _progress(verb, "facets")
    with admin.open(method, path, data, accept="application/x-ndjson") as response:
        for line in response:
            document = json.loads(line)
            if "progress" in document:
                show(document["progress"]["done"], document["progress"]["total"])
            elif "error" in document:
                error = document["error"]
                code = ErrorCode(error.get("code", "internal"))
                raise ERROR_CLASSES[code](error.get("message", "failed"))
            else:
                return document["result"]
    raise ConfigError("the daemon ended the answer without a result")


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]  # a float from here on, for display only
    return str(size)


def cmd_facet_list(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    query = urllib.parse.urlencode(
        {"limit": options.limit, **({"cursor": options.cursor} if options.cursor else {})}
    )

    async def direct(ops: DataOperations) -> dict[str, object]:
        facets, cursor = await ops.list_facets(
            options.tenant, cursor=options.cursor, limit=options.limit
        )
        return {"facets": facets, "next_cursor": cursor}

    result = admin.run_data(
        direct,
        lambda: admin._http(
            "GET", f"/v1/admin/tenants/{urllib.parse.quote(options.tenant)}/facets?{query}", None
        ),
    )
    _out(f"{'AGENT':<32} {'CLASS':<16} {'SIZE':>10} {'LAST ACTIVE (UTC)':<19} {'TIMERS':>6} OPEN")
    for row in result["facets"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["last_active"]))
        timers = "-" if row["timers"] is None else str(row["timers"])
        _out(
            f"{row['agent']:<32} {row['class'] or '?':<16} {_size(row['size_bytes']):>10} "
            f"{when:<19} {timers:>6} {'yes' if row['open'] else 'no'}"
        )
    if result.get("next_cursor"):
        _out(f"(more: --cursor {result['next_cursor']})")
    return 0


def cmd_facet_inspect(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    path = _facet_path("facets", options.tenant, options.agent)

    result = admin.run_data(
        lambda ops: ops.inspect(options.tenant, options.agent),
        lambda: admin._http("GET", path, None),
    )
    width = max(len(key) for key in result)
    for key, value in result.items():
        _out(f"{key:<{width}}  {value}")
    return 0


def cmd_facet_export(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    with contextlib.ExitStack() as stack:
        output: BinaryIO = sys.stdout.buffer
        if options.output not in (None, "-"):
            output = stack.enter_context(Path(options.output).open("xb"))

        async def direct(ops: DataOperations) -> None:
            async with ops.export(options.tenant, options.agent) as chunks:
                async for chunk in chunks:
                    output.write(chunk)

        def through_daemon() -> None:
            path = _facet_path("export", options.tenant, options.agent)
            with admin.open("GET", path, accept="application/x-ndjson") as response:
                shutil.copyfileobj(response, output)

        admin.run_data(direct, through_daemon)
    return 0


def cmd_facet_import(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    with contextlib.ExitStack() as stack:
        source: BinaryIO = sys.stdin.buffer
        if options.file not in (None, "-"):
            source = stack.enter_context(Path(options.file).open("rb"))

        async def direct(ops: DataOperations) -> Any:
            async def chunks() -> AsyncIterator[bytes]:
                while chunk := source.read(256 * 1024):
                    yield chunk

            return await ops.import_facet(
                options.tenant, options.agent, chunks(), force=options.force
            )

        def through_daemon() -> Any:
            path = _facet_path("import", options.tenant, options.agent)
            path += "?force=true" if options.force else ""
            with admin.open("POST", path, source, content_type="application/x-ndjson") as reply:
                return json.loads(reply.read())

        result = admin.run_data(direct, through_daemon)
    _out(f"imported {options.tenant}/{options.agent}: class {result['class']}, {result['entries']}")
    return 0


def cmd_facet_delete(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    admin.run_data(
        lambda ops: ops.delete_facet(options.tenant, options.agent),
        lambda: admin._http("DELETE", _facet_path("facets", options.tenant, options.agent), None),
    )
    _out(f"deleted {options.tenant}/{options.agent}")
    return 0


def cmd_facet_clone(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    to_tenant = options.to_tenant or options.tenant
    body: dict[str, object] = {"to_agent": options.destination, "to_tenant": to_tenant}
    if options.force:
        body["force"] = True
    admin.run_data(
        lambda ops: ops.clone(
            options.tenant, options.source, to_tenant, options.destination, force=options.force
        ),
        lambda: admin._http("POST", _facet_path("clone", options.tenant, options.source), body),
    )
    _out(f"cloned {options.tenant}/{options.source} to {to_tenant}/{options.destination}")
    return 0


def cmd_facet_rebind(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    result = admin.run_data(
        lambda ops: ops.rebind(options.tenant, options.agent, options.cls),
        lambda: admin._http(
            "POST", _facet_path("rebind", options.tenant, options.agent), {"class": options.cls}
        ),
    )
    _out(f"rebound {options.tenant}/{options.agent}: {result['previous_class']} -> {options.cls}")
    return 0


def cmd_backup(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    target = Path(options.path).absolute()
    body: dict[str, object] = {"path": str(target)}
    body.update({k: v for k, v in (("tenant", options.tenant), ("agent", options.agent)) if v})
    result = admin.run_data(
        lambda ops: ops.backup(
            target,
            tenant=options.tenant,
            agent=options.agent,
            progress=_progress("backed up", "facets"),
        ),
        lambda: _long(admin, "POST", "/v1/admin/backups", body, "backed up"),
    )
    _out(
        f"backup of the {result['scope']} in {result['path']}: {result['facets']} facets, "
        f"{_size(result['bytes'])} in {result['seconds']} s; verified"
    )
    return 0


def cmd_restore(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    source = Path(options.path).absolute()
    body: dict[str, object] = {"path": str(source), "force": options.force}
    body.update({k: v for k, v in (("tenant", options.tenant), ("agent", options.agent)) if v})

    async def direct(ops: DataOperations) -> dict[str, Any]:
        result: dict[str, Any] = await ops.restore(
            source,
            tenant=options.tenant,
            agent=options.agent,
            force=options.force,
            system=options.system,
            progress=_progress("restored", "facets"),
        )
        if options.system:
            from .server._admin_key import refresh_admin_key

            assert ops.system is not None
            result["admin_key_created"] = refresh_admin_key(ops.system, admin.key_file)
        return result

    def through_daemon() -> Any:
        if options.system:
            # The daemon serves every credential check from the system store (and holds
            # its environment open): replacing it under a running daemon is not offered.
            raise ConflictError(
                f"a daemon holds {str(admin.data_dir)!r}: stop it to restore the system "
                "store, then run this command again"
            )
        return _long(admin, "POST", "/v1/admin/restores", body, "restored")

    result = admin.run_data(direct, through_daemon)
    what = "the system store and " if result.get("system_restored") else ""
    _out(f"restored {what}{result['facets']} facets from {result['path']}")
    if result.get("admin_key_created"):
        _out(f"the old admin key is not valid in the restored store: new one in {admin.key_file}")
    if result["tenants_created"]:
        _out(f"created tenants (create keys for them): {', '.join(result['tenants_created'])}")
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facetrt", description="facetrt: durable facets on LMDB.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--data-dir", help="data directory (default ./facetrt-data)")
    serve.add_argument("--listen", help="HOST:PORT of the protocol (default 127.0.0.1:7420)")
    serve.add_argument("--http", help="HOST:PORT of the HTTP gateway (default 127.0.0.1:7421)")
    serve.set_defaults(handler=cmd_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_config_check)

    def management(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--data-dir", help="data directory (default ./facetrt-data)")
        sub.add_argument(
            "--url",
            help=f"the daemon's admin URL ({DEFAULT_URL}); given, the command always acts "
            "through that daemon, never on a local data directory",
        )
        sub.add_argument("--admin-key-file", help="admin key file (<data dir>/admin.key)")
        return sub

    tenant = commands.add_parser("tenant", help="tenants").add_subparsers(dest="sub", required=True)
    create = management(tenant.add_parser("create", help="create a tenant and its first key"))
    create.add_argument("name")
    create.set_defaults(handler=cmd_tenant_create)
    tenant_list = management(tenant.add_parser("list", help="list tenants"))
    tenant_list.add_argument("--quotas", action="store_true", help="with their quota overrides")
    tenant_list.set_defaults(handler=cmd_tenant_list)
    delete = management(tenant.add_parser("delete", help="delete a tenant, revoke its keys"))
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_tenant_delete)
    show = management(tenant.add_parser("show", help="a tenant's facet count and quotas"))
    show.add_argument("name")
    show.set_defaults(handler=cmd_tenant_show)
    quota_text = (
        "show a tenant's quotas, or set those given (each a number, or 'default' for the "
        "node default); in force from the next call"
    )
    quota = management(tenant.add_parser("quota", help=quota_text, description=quota_text))
    quota.add_argument("name")
    for flag, text in (
        ("--facets", "facets the tenant may have on this node"),
        ("--bytes-per-facet", "LMDB map size each of its facets may grow to"),
        ("--mailbox", "messages queued per facet before `overloaded`"),
        ("--calls-per-second", "sustained calls per second from outside"),
        ("--burst", "calls at once above the rate (default: one second's worth)"),
        ("--in-flight", "calls in flight across its connections (then they are not read)"),
    ):
        quota.add_argument(flag, type=_quota_value, default=_UNSET, metavar="N", help=text)
    quota.add_argument("--reset", action="store_true", help="drop every override first")
    quota.set_defaults(handler=cmd_tenant_quota)

    key_text = "tenant keys and the admin key"
    key = commands.add_parser("key", help=key_text, description=key_text).add_subparsers(
        dest="sub", required=True
    )
    key_create = management(key.add_parser("create", help="create a key for a tenant"))
    key_create.add_argument("tenant")
    key_create.set_defaults(handler=cmd_key_create)
    key_list = management(key.add_parser("list", help="list a tenant's keys"))
    key_list.add_argument("tenant")
    key_list.set_defaults(handler=cmd_key_list)
    revoke_text = (
        "revoke a key; takes effect at once. Through the daemon, the last active admin key is "
        "refused (replace it with rotate-admin); on the data directory (no daemon) it may be "
        "revoked, and the daemon's next start writes a new admin key"
    )
    revoke = management(
        key.add_parser(
            "revoke", help="revoke a key (takes effect at once)", description=revoke_text
        )
    )
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_key_revoke)
    rotate_text = (
        "replace the admin key: write a new one to the admin key file (mode 0600; through a "
        "running daemon, <its data dir>/admin.key), then revoke every other admin key. Prints "
        "the file and the new key id, never the key. With the daemon stopped it acts on the "
        "data directory: the way to recover a lost admin.key. Interrupted after the new key "
        "is stored, it leaves both keys valid: run it again"
    )
    rotate = management(
        key.add_parser("rotate-admin", help="replace the admin key", description=rotate_text)
    )
    rotate.set_defaults(handler=cmd_key_rotate_admin)

    egress_text = "tenants' egress policies (deny by default; see docs/egress.md)"
    egress = commands.add_parser("egress", help=egress_text, description=egress_text)
    egress_commands = egress.add_subparsers(dest="sub", required=True)
    egress_show = management(egress_commands.add_parser("show", help="a tenant's egress policy"))
    egress_show.add_argument("tenant")
    egress_show.set_defaults(handler=cmd_egress_show)
    set_text = "replace a tenant's egress policy with a JSON file; in force from its next request"
    egress_set = management(egress_commands.add_parser("set", help=set_text, description=set_text))
    egress_set.add_argument("tenant")
    egress_set.add_argument("--file", required=True, help="the policy (JSON; - for stdin)")
    egress_set.set_defaults(handler=cmd_egress_set)
    egress_reset = management(
        egress_commands.add_parser("reset", help="back to the node's default policy")
    )
    egress_reset.add_argument("tenant")
    egress_reset.set_defaults(handler=cmd_egress_reset)

    secret_text = "tenants' secrets, injected into outbound requests for their bound hosts only"
    secret = commands.add_parser("secret", help=secret_text, description=secret_text)
    secret_commands = secret.add_subparsers(dest="sub", required=True)
    set_secret_text = (
        "store a secret (its value read from standard input, never shown); facet code refers "
        "to it as {{secret:NAME}} in a header value"
    )
    secret_set = management(
        secret_commands.add_parser("set", help=set_secret_text, description=set_secret_text)
    )
    secret_set.add_argument("tenant")
    secret_set.add_argument("name")
    secret_set.add_argument(
        "--host",
        action="append",
        required=True,
        help="a host it may be sent to (exact, or *.suffix); repeat for more",
    )
    secret_set.add_argument(
        "--allow-http", action="store_true", help="also over plain http (loopback tests only)"
    )
    secret_set.set_defaults(handler=cmd_secret_set)
    secret_list = management(
        secret_commands.add_parser("list", help="a tenant's secret names and bound hosts")
    )
    secret_list.add_argument("tenant")
    secret_list.set_defaults(handler=cmd_secret_list)
    secret_delete = management(secret_commands.add_parser("delete", help="delete a secret"))
    secret_delete.add_argument("tenant")
    secret_delete.add_argument("name")
    secret_delete.set_defaults(handler=cmd_secret_delete)

    audit_text = "a tenant's egress audit log: every outbound attempt, allowed or denied"
    audit = management(commands.add_parser("audit", help=audit_text, description=audit_text))
    audit.add_argument("--tenant", required=True)
    audit.add_argument(
        "--since",
        type=_since,
        help="only records from this long ago (90s, 30m, 1h, 7d) or unix seconds",
    )
    audit.add_argument("--json", action="store_true", help="JSON lines, one record each")
    audit.add_argument("--limit", type=int, default=10_000, help="records at most (10000)")
    audit.set_defaults(handler=cmd_audit)

    facet = commands.add_parser("facet", help="facets: list, inspect, export, import, ...")
    facet_commands = facet.add_subparsers(dest="sub", required=True)
    facet_list = management(facet_commands.add_parser("list", help="list a tenant's facets"))
    facet_list.add_argument("tenant")
    facet_list.add_argument("--cursor", help="continue after this cursor (printed at the end)")
    facet_list.add_argument("--limit", type=int, default=100, help="facets per page (100)")
    facet_list.set_defaults(handler=cmd_facet_list)

    def facet_command(name: str, text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        sub = management(facet_commands.add_parser(name, help=text, description=text))
        sub.add_argument("tenant")
        sub.set_defaults(handler=handler)
        return sub

    facet_command("inspect", "inspect one facet", cmd_facet_inspect).add_argument("agent")
    export = facet_command("export", "export a facet as JSON lines", cmd_facet_export)
    export.add_argument("agent")
    export.add_argument("-o", "--output", help="file to create (default: standard output)")
    imported = facet_command("import", "create a facet from an export", cmd_facet_import)
    imported.add_argument("agent")
    imported.add_argument("file", nargs="?", help="the export (default: standard input)")
    imported.add_argument("--force", action="store_true", help="replace an existing facet")
    facet_command("delete", "delete a facet and all its data", cmd_facet_delete).add_argument(
        "agent"
    )
    clone = facet_command("clone", "copy a facet to another agent id", cmd_facet_clone)
    clone.add_argument("source")
    clone.add_argument("destination")
    clone.add_argument("--to-tenant", help="the destination's tenant (default: the same)")
    clone.add_argument("--force", action="store_true", help="replace an existing destination")
    rebind = facet_command("rebind", "bind a facet to another class", cmd_facet_rebind)
    rebind.add_argument("agent")
    rebind.add_argument("cls", metavar="class")

    backup = management(
        commands.add_parser("backup", help="back up a facet, a tenant or the node (verified)")
    )
    backup.add_argument("path", help="a new or empty directory (on the daemon's machine)")
    backup.add_argument("--tenant", help="only this tenant")
    backup.add_argument("--agent", help="only this facet (with --tenant)")
    backup.set_defaults(handler=cmd_backup)
    restore = management(commands.add_parser("restore", help="restore facets from a backup"))
    restore.add_argument("path", help="the backup directory")
    restore.add_argument("--tenant", help="only this tenant's facets")
    restore.add_argument("--agent", help="only this facet (with --tenant)")
    restore.add_argument("--force", action="store_true", help="replace existing facets")
    restore.add_argument(
        "--system",
        action="store_true",
        help="also restore the system store (tenants, hashed keys) of a node backup; only "
        "with no daemon running, and with --force over a system store holding anything",
    )
    restore.set_defaults(handler=cmd_restore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Callable[[argparse.Namespace], int] = options.handler
    try:
        return handler(options)
    except FacetrtError as exc:
        _err(f"facetrt: {exc.code.value}: {exc.message}")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`facetrt facet list | head`): not worth a traceback. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a writer killed by it


if __name__ == "__main__":
    sys.exit(main())
