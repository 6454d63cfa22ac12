"""The `facetrt` command: the daemon and its management commands.

Management commands act through the running daemon's admin API (``--url``, the admin key read
from ``<data dir>/admin.key``) and, where no daemon holds the data directory, directly on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._errors import ERROR_CLASSES, ConfigError, ErrorCode, FacetrtError
from .config import load_daemon_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .storage import SystemStore

DEFAULT_URL = "http://127.0.0.1:7421"
DEFAULT_DATA_DIR = Path("facetrt-data")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(options: argparse.Namespace) -> int:
    import os

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

    trio.run(main)
    return 0


def cmd_config_check(options: argparse.Namespace) -> int:
    import os

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
        self.url = options.url.rstrip("/")
        self.key_file = Path(options.admin_key_file or self.data_dir / "admin.key")

    def run(
        self,
        direct: Callable[[SystemStore], Any],
        method: str,
        path: str,
        body: dict[str, object] | None = None,
    ) -> Any:
        from .storage import DataDirLock, SystemStore

        try:
            lock = DataDirLock(self.data_dir)
        except ConfigError:
            return self._http(method, path, body)  # a daemon holds the directory
        try:
            system = SystemStore(self.data_dir / "system")
            try:
                return direct(system)
            finally:
                system.close()
        finally:
            lock.release()

    def _http(self, method: str, path: str, body: dict[str, object] | None) -> Any:
        try:
            key = self.key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin key {str(self.key_file)!r}: {exc}") from exc
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            error = json.loads(exc.read() or b"{}").get("error", {})
            code = ErrorCode(error.get("code", "internal"))
            raise ERROR_CLASSES[code](error.get("message", str(exc))) from None
        except urllib.error.URLError as exc:
            raise ConfigError(f"cannot reach the daemon at {self.url}: {exc.reason}") from None


def cmd_tenant_create(options: argparse.Namespace) -> int:
    def direct(system: SystemStore) -> dict[str, str]:
        system.create_tenant(options.name)
        key_id, key = system.create_key(options.name)
        return {"tenant": options.name, "key_id": key_id, "key": key}

    result = _Admin(options).run(direct, "POST", "/v1/admin/tenants", {"tenant": options.name})
    _out(f"created tenant {result['tenant']} with key id {result['key_id']}")
    _out("its key (shown only this once; store it safely):")
    _out(result["key"])
    return 0


def cmd_tenant_list(options: argparse.Namespace) -> int:
    result = _Admin(options).run(
        lambda system: {"tenants": system.list_tenants()}, "GET", "/v1/admin/tenants"
    )
    for tenant in result["tenants"]:
        _out(tenant)
    return 0


def cmd_tenant_delete(options: argparse.Namespace) -> int:
    result = _Admin(options).run(
        lambda system: {"revoked_keys": system.delete_tenant(options.name)},
        "DELETE",
        f"/v1/admin/tenants/{urllib.parse.quote(options.name)}",
    )
    _out(f"deleted tenant {options.name}; revoked {result['revoked_keys']} keys")
    return 0


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
    _Admin(options).run(
        lambda system: system.revoke_key(options.key_id),
        "DELETE",
        f"/v1/admin/keys/{urllib.parse.quote(options.key_id)}",
    )
    _out(f"revoked key {options.key_id}")
    return 0


def cmd_facet_list(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    query = urllib.parse.urlencode(
        {"limit": options.limit, **({"cursor": options.cursor} if options.cursor else {})}
    )
    result = admin._http(
        "GET", f"/v1/admin/tenants/{urllib.parse.quote(options.tenant)}/facets?{query}", None
    )
    for agent in result["facets"]:
        _out(agent)
    if result.get("next_cursor"):
        _out(f"(more: --cursor {result['next_cursor']})")
    return 0


def cmd_facet_inspect(options: argparse.Namespace) -> int:
    admin = _Admin(options)
    tenant = urllib.parse.quote(options.tenant)
    path = f"/v1/admin/tenants/{tenant}/facets/{urllib.parse.quote(options.agent, safe='/')}"
    result = admin._http("GET", path, None)
    width = max(len(key) for key in result)
    for key, value in result.items():
        _out(f"{key:<{width}}  {value}")
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
        sub.add_argument("--url", default=DEFAULT_URL, help=f"daemon admin URL ({DEFAULT_URL})")
        sub.add_argument("--admin-key-file", help="admin key file (<data dir>/admin.key)")
        return sub

    tenant = commands.add_parser("tenant", help="tenants").add_subparsers(dest="sub", required=True)
    create = management(tenant.add_parser("create", help="create a tenant and its first key"))
    create.add_argument("name")
    create.set_defaults(handler=cmd_tenant_create)
    management(tenant.add_parser("list", help="list tenants")).set_defaults(handler=cmd_tenant_list)
    delete = management(tenant.add_parser("delete", help="delete a tenant, revoke its keys"))
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_tenant_delete)

    key = commands.add_parser("key", help="tenant keys").add_subparsers(dest="sub", required=True)
    key_create = management(key.add_parser("create", help="create a key for a tenant"))
    key_create.add_argument("tenant")
    key_create.set_defaults(handler=cmd_key_create)
    key_list = management(key.add_parser("list", help="list a tenant's keys"))
    key_list.add_argument("tenant")
    key_list.set_defaults(handler=cmd_key_list)
    revoke = management(key.add_parser("revoke", help="revoke a key (takes effect at once)"))
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_key_revoke)

    facet = commands.add_parser("facet", help="facets (needs a running daemon)")
    facet_commands = facet.add_subparsers(dest="sub", required=True)
    facet_list = management(facet_commands.add_parser("list", help="list a tenant's facets"))
    facet_list.add_argument("tenant")
    facet_list.add_argument("--cursor")
    facet_list.add_argument("--limit", type=int, default=100)
    facet_list.set_defaults(handler=cmd_facet_list)
    inspect = management(facet_commands.add_parser("inspect", help="inspect one facet"))
    inspect.add_argument("tenant")
    inspect.add_argument("agent")
    inspect.set_defaults(handler=cmd_facet_inspect)
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


if __name__ == "__main__":
    sys.exit(main())
