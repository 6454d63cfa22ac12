"""The operator routes of the HTTP gateway, under ``/v1/admin/`` (admin key only).

::

    GET    tenants                          {"tenants": [id, ...], "quotas": {id: overrides}}
    POST   tenants          {"tenant": id}  201 {"tenant", "key_id", "key"}  (key shown once)
    DELETE tenants/{t}                      {"revoked_keys", "deleted_facets"} (wipes its facets)
    GET    tenants/{t}/keys                 {"keys": [{"key_id", "tenant", "created", "revoked"}]}
    POST   tenants/{t}/keys                 201 {"tenant", "key_id", "key"}
    GET    tenants/{t}/quotas               {"tenant", "facets", "quotas", "overrides"}
    GET    tenants/{t}/egress               {"tenant", "policy", "source": "tenant"|"default"}
    PUT    tenants/{t}/egress  {policy}     the same; replaces the tenant's policy, in force
                                            from its next outbound request
    DELETE tenants/{t}/egress               the same; back to the node default policy
    GET    tenants/{t}/secrets              {"secrets": [{"name", "hosts", "allow_http",
                                            "created"}]} (names and hosts, never values)
    PUT    tenants/{t}/secrets/{name}  {"value", "hosts", "allow_http"?}   the same, one
                                            secret (the value is never shown back)
    DELETE tenants/{t}/secrets/{name}       {"name", "deleted": true}
    GET    tenants/{t}/audit?since=&after=&limit=   {"records": [...], "next": cursor|null}
                                            egress attempts, oldest first (since: unix s)
    PUT    tenants/{t}/quotas  {overrides}  the same; replaces every override (null or
                                            missing: the node default), in force at once
    DELETE keys/{key id}                    {"key_id", "revoked": true} (never the last
                                            active admin key: 409; rotate it instead)
    POST   admin-key/rotate                 {"path", "key_id", "revoked_key_ids"}: a new
                                            admin key in the daemon's admin key file, then
                                            every other admin key revoked (never the key)
    GET    tenants/{t}/facets?cursor=&limit= {"facets": [{"agent", "class", "size_bytes",
                                            "last_active", "timers", "open"}], "next_cursor"}
    GET    tenants/{t}/facets/{agent...}    Runtime.inspect (class, keys, map size, mailbox)
    DELETE tenants/{t}/facets/{agent...}    {"agent", "deleted": true}
    GET    tenants/{t}/export/{agent...}    the export, application/x-ndjson (streamed)
    POST   tenants/{t}/import/{agent...}?force=true   body: an export (x-ndjson, streamed)
    POST   tenants/{t}/clone/{agent...}     {"to_agent", "to_tenant"?, "force"?}
    POST   tenants/{t}/rebind/{agent...}    {"class"}
    POST   backups                          {"path", "tenant"?, "agent"?}   (daemon's disk)
    POST   restores                         {"path", "tenant"?, "agent"?, "force"?}

The verb comes before the agent id because agent ids may hold ``/``. Tenant deletion, backups
and restores are long: with ``Accept: application/x-ndjson`` they answer a stream of
``{"progress": {"done", "total"}}`` lines (at most every ``PROGRESS_SECONDS``) ending with
``{"result": ...}`` or ``{"error": ...}``; otherwise one JSON body at the end.

Times are seconds since the epoch. Handlers raise :class:`FacetrtError` (rendered by
``_http``) and return (status, JSON-ready payload); they never see or log a key after it is
returned.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar, final

import trio

from .._errors import BadRequestError, FacetrtError, NotFoundError
from .._ids import validate_tenant_id
from ..config import TenantQuotaSettings
from ..data import DataOperations, refuse_leftover_tenant_data
from ..policy import EgressPolicy, Policies, secret_listing
from ._admin_key import rotate_admin_key
from ._http_exchange import dump_json, to_json

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from .._values import Value
    from ..policy import Egress
    from ..runtime import Runtime
    from ..storage import SystemStore
    from ._http_exchange import Exchange

    Progress = Callable[[int, int | None], None]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# route name -> allowed methods
ADMIN_ROUTES: Final[Mapping[str, tuple[str, ...]]] = {
    "tenants": ("GET", "POST"),
    "tenant": ("DELETE",),
    "tenant_keys": ("GET", "POST"),
    "tenant_quotas": ("GET", "PUT"),
    "tenant_egress": ("GET", "PUT", "DELETE"),
    "tenant_audit": ("GET",),
    "tenant_secrets": ("GET",),
    "tenant_secret": ("PUT", "DELETE"),
    "key": ("DELETE",),
    "admin_key_rotate": ("POST",),
    "tenant_facets": ("GET",),
    "facet": ("GET", "DELETE"),
    "export": ("GET",),
    "import": ("POST",),
    "clone": ("POST",),
    "rebind": ("POST",),
    "backups": ("POST",),
    "restores": ("POST",),
}
# Routes that read or write their body themselves (streams), or may answer a stream.
EXCHANGE_ROUTES: Final = frozenset({"export", "import", "tenant", "backups", "restores"})
NDJSON: Final = b"application/x-ndjson"
IMPORT_TYPES: Final = (NDJSON, b"application/jsonl", b"application/json-lines")
PROGRESS_SECONDS: Final = 0.5
FACETS_PAGE_MAX: Final = 1000
FACETS_PAGE_DEFAULT: Final = 100
AUDIT_PAGE_DEFAULT: Final = 1000
AUDIT_PAGE_MAX: Final = 10_000


def resolve_admin_route(segments: list[str]) -> tuple[str, tuple[str, ...]] | None:
    """(route name, path parameters) for the segments after ``/v1/admin/``, or None."""
    match segments:
        case ["tenants"]:
            return "tenants", ()
        case ["tenants", tenant]:
            return "tenant", (tenant,)
        case ["tenants", tenant, "keys"]:
            return "tenant_keys", (tenant,)
        case ["tenants", tenant, "quotas"]:
            return "tenant_quotas", (tenant,)
        case ["tenants", tenant, "egress"]:
            return "tenant_egress", (tenant,)
        case ["tenants", tenant, "audit"]:
            return "tenant_audit", (tenant,)
        case ["tenants", tenant, "secrets"]:
            return "tenant_secrets", (tenant,)
        case ["tenants", tenant, "secrets", name]:
            return "tenant_secret", (tenant, name)
        case ["keys", key_id]:
            return "key", (key_id,)
        case ["admin-key", "rotate"]:
            return "admin_key_rotate", ()
        case ["tenants", tenant, "facets"]:
            return "tenant_facets", (tenant,)
        case ["tenants", tenant, "facets", *agent] if agent:
            return "facet", (tenant, "/".join(agent))
        case ["tenants", tenant, ("export" | "import" | "clone" | "rebind") as verb, *agent] if (
            agent
        ):
            return verb, (tenant, "/".join(agent))
        case ["backups" | "restores" as name]:
            return name, ()
    return None


@final
class AdminApi:
    def __init__(
        self,
        *,
        runtime: Runtime,
        system: SystemStore,
        admin_key_path: Path,
        egress: Egress | None = None,
    ) -> None:
        self._runtime = runtime
        self._system = system
        self._admin_key_path = admin_key_path
        # Two rotations at once would share the key file's temporary file.
        self._rotation_lock = trio.Lock()
        self._egress_service = egress
        self._policies = egress.policies if egress is not None else Policies()
        self._data = DataOperations(runtime, system=system)

    async def handle(
        self,
        name: str,
        method: str,
        params: tuple[str, ...],
        query: Mapping[str, list[str]],
        body: object,
    ) -> tuple[int, object]:
        """Run one admin route (its method already checked).

        Raises:
            FacetrtError: bad input (400), unknown tenant, key or facet (404), conflict (409).
        """
        system = self._system
        match name, method:
            case "tenants", "GET":
                return 200, {"tenants": system.list_tenants(), "quotas": system.all_tenant_quotas()}
            case "tenants", "POST":
                return await self._create_tenant(body)
            case "tenant_keys", "GET":
                return 200, {"keys": self._keys(params[0])}
            case "tenant_keys", "POST":
                _check_empty(body)
                tenant = validate_tenant_id(params[0])
                key_id, key = await self._offload(partial(system.create_key, tenant))
                logger.info("created key %s for tenant %s", key_id, tenant)
                return 201, {"tenant": tenant, "key_id": key_id, "key": key}
            case "tenant_quotas", "GET":
                return 200, await self._quotas(params[0])
            case "tenant_quotas", "PUT":
                return 200, await self._set_quotas(params[0], body)
            case "tenant_egress", "GET":
                return 200, self._egress(params[0])
            case "tenant_egress", "PUT":
                return 200, await self._set_egress(params[0], EgressPolicy.parse(body))
            case "tenant_egress", "DELETE":
                _check_empty(body)
                return 200, await self._set_egress(params[0], None)
            case "tenant_audit", "GET":
                return 200, await self._audit(params[0], query)
            case "tenant_secrets", "GET":
                return 200, {"secrets": self._secrets(params[0])}
            case "tenant_secret", "PUT":
                return 200, await self._set_secret(params[0], params[1], body)
            case "tenant_secret", "DELETE":
                _check_empty(body)
                store = self._secret_store(params[0])
                await self._offload(partial(store.delete_secret, params[0], params[1]))
                self._reload_secrets(params[0])
                logger.info("deleted secret %s of tenant %s", params[1], params[0])
                return 200, {"name": params[1], "deleted": True}
            case "key", "DELETE":
                await self._revoke(params[0])
                return 200, {"key_id": params[0], "revoked": True}
            case "admin_key_rotate", "POST":
                _check_empty(body)
                return 200, await self._rotate_admin_key()
            case "tenant_facets", "GET":
                return 200, await self._facets(params[0], query)
            case "facet", "GET":
                return 200, await self._data.inspect(params[0], params[1])
            case "facet", "DELETE":
                return 200, await self._data.delete_facet(params[0], params[1])
            case "clone", "POST":
                fields = _fields(body, required={"to_agent"}, optional={"to_tenant", "force"})
                to_tenant = fields.get("to_tenant", params[0])
                return 200, await self._data.clone(
                    params[0],
                    params[1],
                    _text(to_tenant, "to_tenant"),
                    _text(fields["to_agent"], "to_agent"),
                    force=_flag(fields.get("force")),
                )
            case "rebind", "POST":
                fields = _fields(body, required={"class"}, optional=set())
                return 200, await self._data.rebind(
                    params[0], params[1], _text(fields["class"], "class")
                )
        raise AssertionError(f"unhandled admin route {name} {method}")

    async def handle_exchange(self, name: str, x: Exchange, params: tuple[str, ...]) -> None:
        """Run a route that streams its body or its answer (its method already checked)."""
        match name:
            case "export":
                async with self._data.export(params[0], params[1]) as chunks:
                    await x.respond_stream(200, NDJSON, chunks)
            case "import":
                force = _flag((x.query().get("force") or [""])[0] or None)
                limit = 3 * self._runtime.config.map_size_bytes_max
                chunks = x.body_chunks(limit, IMPORT_TYPES)
                result = await self._data.import_facet(params[0], params[1], chunks, force=force)
                logger.info("imported a facet of tenant %s", params[0])
                await x.respond_json(200, result)
            case "tenant":
                deleted = validate_tenant_id(params[0])

                async def delete(progress: Progress) -> dict[str, Value]:
                    # Its egress policy and secrets went with its system-store record (the
                    # first step): drop the copies in force, whatever the wipe does next.
                    try:
                        return await self._data.delete_tenant(deleted, progress)
                    finally:
                        self._forget_egress(deleted)

                await self._long(x, delete)
            case "backups":
                fields = _fields(
                    await x.read_json(), required={"path"}, optional={"tenant", "agent"}
                )
                path = _path(fields["path"])
                tenant, agent = _optional_text(fields, "tenant"), _optional_text(fields, "agent")
                await self._long(
                    x,
                    lambda progress: self._data.backup(
                        path, tenant=tenant, agent=agent, progress=progress
                    ),
                )
            case "restores":
                fields = _fields(
                    await x.read_json(), required={"path"}, optional={"tenant", "agent", "force"}
                )
                path = _path(fields["path"])
                tenant, agent = _optional_text(fields, "tenant"), _optional_text(fields, "agent")
                force = _flag(fields.get("force"))
                await self._long(
                    x,
                    lambda progress: self._data.restore(
                        path, tenant=tenant, agent=agent, force=force, progress=progress
                    ),
                )
            case _:
                raise AssertionError(f"unhandled admin route {name}")

    async def _long(
        self, x: Exchange, run: Callable[[Progress], Awaitable[dict[str, Value]]]
    ) -> None:
        """Answer a long operation: one JSON body, or progress lines then the result."""
        if not x.accepts(NDJSON):
            await x.respond_json(200, await run(lambda done, total: None))
            return
        latest: list[tuple[int, int | None]] = []
        finished = trio.Event()
        outcome: dict[str, object] = {}

        def progress(done: int, total: int | None) -> None:
            latest[:] = [(done, total)]  # only the newest matters: bounded

        async def work() -> None:
            try:
                outcome["result"] = await run(progress)
            except FacetrtError as exc:
                outcome["error"] = {
                    "code": exc.code.value,
                    "message": exc.message,
                    "retryable": exc.retryable,
                }
            finally:
                finished.set()

        async def lines() -> AsyncIterator[bytes]:
            while not finished.is_set():
                with trio.move_on_after(PROGRESS_SECONDS):
                    await finished.wait()
                if latest:
                    done, total = latest.pop()
                    yield dump_json({"progress": {"done": done, "total": total}}) + b"\n"
            yield dump_json(to_json(outcome)) + b"\n"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            await x.respond_stream(200, NDJSON, lines())

    async def _offload(self, job: Callable[[], T]) -> T:
        """Run a system-store write on a writer thread: its fsync must not stop the loop
        (every facet of the node) for a millisecond or, on a busy disk, for many."""
        return await self._runtime.core.workers.call(job)

    async def _create_tenant(self, body: object) -> tuple[int, object]:
        if not isinstance(body, dict) or set(body) != {"tenant"}:
            raise BadRequestError('send {"tenant": "<tenant id>"}')
        tenant = validate_tenant_id(body["tenant"])
        refuse_leftover_tenant_data(self._runtime.core.registry.tenant_path(tenant), tenant)
        key_id, key = await self._offload(partial(self._system.create_tenant_with_key, tenant))
        self._forget_egress(tenant)  # a new tenant starts with the node default, no secrets
        logger.info("created tenant %s with key %s", tenant, key_id)
        return 201, {"tenant": tenant, "key_id": key_id, "key": key}

    def _forget_egress(self, tenant: str) -> None:
        """Drop ``tenant``'s policy and opened secrets from the egress layer (not stored)."""
        self._policies.set(tenant, None)
        if self._egress_service is not None:
            self._egress_service.secrets.set_tenant(tenant, [])

    def _keys(self, tenant: str) -> list[dict[str, object]]:
        validate_tenant_id(tenant)
        if not self._system.tenant_exists(tenant):
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        return [
            {
                "key_id": record.key_id,
                "tenant": record.tenant,
                "created": record.created,
                "revoked": record.revoked,
            }
            for record in self._system.list_keys(tenant)
        ]

    async def _quotas(self, tenant: str) -> dict[str, object]:
        validate_tenant_id(tenant)
        if not self._system.tenant_exists(tenant):
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        runtime = self._runtime
        overrides = runtime.tenant_quota_overrides(tenant)
        return {
            "tenant": tenant,
            "facets": await runtime.tenant_facet_count(tenant),
            "quotas": dataclasses.asdict(runtime.tenant_quotas(tenant)),
            "overrides": {} if overrides is None else overrides.overrides(),
        }

    async def _set_quotas(self, tenant: str, body: object) -> dict[str, object]:
        validate_tenant_id(tenant)
        if not isinstance(body, dict):
            raise BadRequestError('send a JSON object of quotas, e.g. {"facets_max": 1000}')
        settings = TenantQuotaSettings.parse(body)
        # Durable first: a quota the node enforces is one it still enforces after a restart.
        await self._offload(partial(self._system.set_tenant_quotas, tenant, settings.overrides()))
        self._runtime.set_tenant_quotas(tenant, settings)
        logger.info("set the quotas of tenant %s: %s", tenant, settings.overrides())
        return await self._quotas(tenant)

    def _egress(self, tenant: str) -> dict[str, object]:
        validate_tenant_id(tenant)
        if not self._system.tenant_exists(tenant):
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        own = self._policies.own(tenant)
        policy = own if own is not None else self._policies.default
        return {
            "tenant": tenant,
            "policy": policy.to_json(),
            "source": "default" if own is None else "tenant",
        }

    async def _set_egress(self, tenant: str, policy: EgressPolicy | None) -> dict[str, object]:
        validate_tenant_id(tenant)
        stored = None if policy is None else policy.to_json()
        # Durable first: a policy the node enforces is one it still enforces after a restart.
        await self._offload(partial(self._system.set_tenant_egress, tenant, stored))
        self._policies.set(tenant, policy)
        logger.info("set the egress policy of tenant %s (own: %s)", tenant, policy is not None)
        return self._egress(tenant)

    async def _audit(self, tenant: str, query: Mapping[str, list[str]]) -> dict[str, object]:
        validate_tenant_id(tenant)
        if self._egress_service is None:
            raise NotFoundError("this node has no egress audit log")
        since_text = (query.get("since") or [""])[0]
        after = (query.get("after") or [""])[0] or None
        limit_text = (query.get("limit") or [""])[0]
        try:
            since = float(since_text) if since_text else None
            limit = int(limit_text) if limit_text else AUDIT_PAGE_DEFAULT
            if after is not None:
                bytes.fromhex(after)
        except ValueError:
            raise BadRequestError(
                "since is unix seconds, limit an integer, after a cursor"
            ) from None
        if not 0 < limit <= AUDIT_PAGE_MAX:
            raise BadRequestError(f"limit must be from 1 to {AUDIT_PAGE_MAX}")
        records, cursor = await self._egress_service.audit.read(
            tenant, since=since, after=after, limit=limit
        )
        return {"records": records, "next": cursor}

    def _secret_store(self, tenant: str) -> SystemStore:
        validate_tenant_id(tenant)
        if not self._system.tenant_exists(tenant):
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        return self._system

    def _secrets(self, tenant: str) -> list[dict[str, object]]:
        return secret_listing(self._secret_store(tenant), tenant)

    async def _set_secret(self, tenant: str, name: str, body: object) -> dict[str, object]:
        system = self._secret_store(tenant)
        egress = self._egress_service
        if egress is None or egress.node_key is None:
            raise NotFoundError("this node keeps no secrets (no egress node key)")
        fields = _fields(body, required={"value", "hosts"}, optional={"allow_http"})
        hosts = fields["hosts"]
        if not isinstance(hosts, list):
            raise BadRequestError("hosts must be a list of host names or *.suffix patterns")
        record = egress.node_key.seal(
            tenant,
            name,
            _text(fields["value"], "value"),
            hosts,
            allow_http=_flag(fields.get("allow_http")),
        )
        await self._offload(partial(system.put_secret, tenant, name, record))  # durable first
        self._reload_secrets(tenant)
        logger.info("set secret %s of tenant %s", name, tenant)  # never the value
        return {"name": name, "hosts": record["hosts"], "allow_http": record["allow_http"]}

    def _reload_secrets(self, tenant: str) -> None:
        egress = self._egress_service
        if egress is not None and egress.node_key is not None:
            egress.secrets.reload_tenant(self._system, egress.node_key, tenant)

    async def _revoke(self, key_id: str) -> None:
        await self._offload(partial(self._system.revoke_key, key_id, keep_an_admin_key=True))
        logger.info("revoked key %s", key_id)

    async def _rotate_admin_key(self) -> dict[str, object]:
        """Replace the admin key (``_admin_key``): written and stored before the old keys
        are revoked, all on a writer thread. Cancelled once submitted, it still completes
        (the answer is lost; the file holds the new key)."""
        async with self._rotation_lock:
            rotation = await self._offload(
                partial(rotate_admin_key, self._system, self._admin_key_path)
            )
        return {
            "path": str(rotation.path.absolute()),
            "key_id": rotation.key_id,
            "revoked_key_ids": list(rotation.revoked_key_ids),
        }

    async def _facets(self, tenant: str, query: Mapping[str, list[str]]) -> dict[str, object]:
        cursor = (query.get("cursor") or [""])[0] or None
        text = (query.get("limit") or [""])[0]
        if text and not (text.isascii() and text.isdigit() and 0 < int(text) <= FACETS_PAGE_MAX):
            raise BadRequestError(f"limit must be an integer from 1 to {FACETS_PAGE_MAX}")
        limit = int(text) if text else FACETS_PAGE_DEFAULT
        facets, next_cursor = await self._data.list_facets(tenant, cursor=cursor, limit=limit)
        return {"facets": facets, "next_cursor": next_cursor}


def _check_empty(body: object) -> None:
    if body not in (None, {}):
        raise BadRequestError("this route takes no body (or {})")


def _fields(body: object, *, required: set[str], optional: set[str]) -> dict[str, object]:
    if not isinstance(body, dict) or not required <= set(body) <= required | optional:
        names = ", ".join(sorted(required)) + "".join(f", {name}?" for name in sorted(optional))
        raise BadRequestError(f"send a JSON object with {names}")
    return body


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    return value


def _optional_text(fields: dict[str, object], name: str) -> str | None:
    value = fields.get(name)
    return None if value is None else _text(value, name)


def _flag(value: object) -> bool:
    if value in (None, False, "", "false", "0"):
        return False
    if value in (True, "true", "1"):
        return True
    raise BadRequestError(f"force must be true or false, got {value!r}")


def _path(value: object) -> Path:
    """A backup location on the daemon's disk: an absolute path."""
    path = Path(_text(value, "path"))
    if not path.is_absolute() or ".." in path.parts:
        raise BadRequestError("path must be absolute, without '..' (it is on the daemon's disk)")
    return path
