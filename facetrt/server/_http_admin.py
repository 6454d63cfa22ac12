"""The operator routes of the HTTP gateway, under ``/v1/admin/`` (admin key only).

::

    GET    tenants                          {"tenants": [id, ...]}
    POST   tenants          {"tenant": id}  201 {"tenant", "key_id", "key"}  (key shown once)
    DELETE tenants/{t}                      {"revoked_keys": n}
    GET    tenants/{t}/keys                 {"keys": [{"key_id", "tenant", "created", "revoked"}]}
    POST   tenants/{t}/keys                 201 {"tenant", "key_id", "key"}
    DELETE keys/{key id}                    {"key_id", "revoked": true}
    GET    tenants/{t}/facets?cursor=&limit= {"facets": [agent id, ...], "next_cursor"}
    GET    tenants/{t}/facets/{agent...}    Runtime.inspect (class, keys, map size, mailbox)

Times are seconds since the epoch. Handlers raise :class:`FacetrtError` (rendered by
``_http``) and return (status, JSON-ready payload); they never see or log a key after it is
returned.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, final

from .._errors import BadRequestError, ConflictError, NotFoundError
from .._ids import validate_tenant_id

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..runtime import Runtime
    from ..storage import SystemStore

logger = logging.getLogger(__name__)

# route name -> allowed methods
ADMIN_ROUTES: Final[Mapping[str, tuple[str, ...]]] = {
    "tenants": ("GET", "POST"),
    "tenant": ("DELETE",),
    "tenant_keys": ("GET", "POST"),
    "key": ("DELETE",),
    "tenant_facets": ("GET",),
    "facet": ("GET",),
}
FACETS_PAGE_MAX: Final = 1000
FACETS_PAGE_DEFAULT: Final = 100


def resolve_admin_route(segments: list[str]) -> tuple[str, tuple[str, ...]] | None:
    """(route name, path parameters) for the segments after ``/v1/admin/``, or None."""
    match segments:
        case ["tenants"]:
            return "tenants", ()
        case ["tenants", tenant]:
            return "tenant", (tenant,)
        case ["tenants", tenant, "keys"]:
            return "tenant_keys", (tenant,)
        case ["keys", key_id]:
            return "key", (key_id,)
        case ["tenants", tenant, "facets"]:
            return "tenant_facets", (tenant,)
        case ["tenants", tenant, "facets", *agent] if agent:
            return "facet", (tenant, "/".join(agent))
    return None


@final
class AdminApi:
    def __init__(self, *, runtime: Runtime, system: SystemStore) -> None:
        self._runtime = runtime
        self._system = system

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
                return 200, {"tenants": system.list_tenants()}
            case "tenants", "POST":
                return self._create_tenant(body)
            case "tenant", "DELETE":
                tenant = validate_tenant_id(params[0])
                revoked = system.delete_tenant(tenant)
                logger.info("deleted tenant %s and revoked %d keys", tenant, revoked)
                return 200, {"revoked_keys": revoked}
            case "tenant_keys", "GET":
                return 200, {"keys": self._keys(params[0])}
            case "tenant_keys", "POST":
                _check_empty(body)
                tenant = validate_tenant_id(params[0])
                key_id, key = system.create_key(tenant)
                logger.info("created key %s for tenant %s", key_id, tenant)
                return 201, {"tenant": tenant, "key_id": key_id, "key": key}
            case "key", "DELETE":
                self._revoke(params[0])
                return 200, {"key_id": params[0], "revoked": True}
            case "tenant_facets", "GET":
                return 200, self._facets(params[0], query)
            case "facet", "GET":
                return 200, await self._runtime.inspect(params[0], params[1])
        raise AssertionError(f"unhandled admin route {name} {method}")

    def _create_tenant(self, body: object) -> tuple[int, object]:
        if not isinstance(body, dict) or set(body) != {"tenant"}:
            raise BadRequestError('send {"tenant": "<tenant id>"}')
        tenant = validate_tenant_id(body["tenant"])
        self._system.create_tenant(tenant)
        key_id, key = self._system.create_key(tenant)
        logger.info("created tenant %s with key %s", tenant, key_id)
        return 201, {"tenant": tenant, "key_id": key_id, "key": key}

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

    def _revoke(self, key_id: str) -> None:
        records = self._system.list_keys()
        admins = [r.key_id for r in records if r.is_admin and r.revoked is None]
        if admins == [key_id]:
            raise ConflictError("refusing to revoke the last admin key; create another first")
        self._system.revoke_key(key_id)
        logger.info("revoked key %s", key_id)

    def _facets(self, tenant: str, query: Mapping[str, list[str]]) -> dict[str, object]:
        cursor = (query.get("cursor") or [""])[0] or None
        text = (query.get("limit") or [""])[0]
        if text and not (text.isdigit() and 0 < int(text) <= FACETS_PAGE_MAX):
            raise BadRequestError(f"limit must be an integer from 1 to {FACETS_PAGE_MAX}")
        limit = int(text) if text else FACETS_PAGE_DEFAULT
        facets, next_cursor = self._runtime.list_facets(tenant, cursor=cursor, limit=limit)
        return {"facets": facets, "next_cursor": next_cursor}


def _check_empty(body: object) -> None:
    if body not in (None, {}):
        raise BadRequestError("this route takes no body (or {})")
