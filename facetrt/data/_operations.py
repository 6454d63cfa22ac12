"""DataOperations: list, export, import, delete, clone, rebind, backup and restore facets.

Used by the daemon's admin API and, with no daemon running, by the CLI on an embedded runtime
of its own: one implementation for both. Every operation is serialized with the facet's
messages through the router (decision 0008):

- reads (export, clone's source, backup) take a *snapshot*: LMDB's compacting copy of the
  store, made on a writer thread while the facet keeps serving (``Router.reading``);
- replacements (import, clone's target, restore, rebind, delete) build the new store in
  ``scratch/``, verify and fsync it, then swap it in under ``Router.hold``: the facet's
  activation finishes its current message and closes, calls queue meanwhile, and the next
  activation sees the new state.

Blocking work (copies, checksums, verification, renames) runs on the runtime's writer threads,
never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar, final

import msgpack
import trio

from .._errors import BadRequestError, ConflictError, FacetrtError, NotFoundError, StorageError
from .._ids import FacetAddress, validate_tenant_id
from ..storage import META_DB, CommitBatch, fsync_dir
from ..storage._registry import list_facets_in, write_hint
from ._backup import (
    SYSTEM_PATH,
    BackupEntry,
    Manifest,
    ManifestWriter,
    check_copy,
    check_system_copy,
    entry_path,
    prepare_target,
    read_manifest,
    seal_copy,
)
from ._environment import TimerScan, check_records, scan_timers, set_identity, verify_store
from ._files import (
    DATA_FILE,
    clear_scratch,
    fsync_file,
    install_store,
    new_scratch_dir,
    remove_store,
    remove_tree,
    sha256_file,
)
from ._jsonl import WRITE_BATCH_BYTES, ImportBuilder, LineSplitter, export_lines, line_bytes_max

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
    from pathlib import Path

    from .._values import Value
    from ..runtime import Runtime
    from ..storage import FacetRecord, SystemStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
PAGE: Final = 256
EXPORT_CHUNK_BYTES: Final = 256 * 1024


def _no_progress(done: int, total: int | None) -> None:
    pass


@final
class DataOperations:
    """Data operations on the facets of one runtime (and its system store, if any).

    Args:
        runtime: the runtime hosting the facets.
        system: the node's tenants and keys; None for a bare embedded runtime.
        check_classes: refuse to rebind to a class the runtime does not serve (off for the
            CLI's direct mode, which serves none).
        offline: this process owns the data directory and serves nobody (the CLI's direct
            mode): only then may ``restore`` replace the system store.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        system: SystemStore | None,
        check_classes: bool = True,
        offline: bool = False,
    ) -> None:
        core = runtime.core
        assert core.router is not None
        self._runtime = runtime
        self._core = core
        self._router = core.router
        self._registry = core.registry
        self._system = system
        self._check_classes = check_classes
        self._offline = offline
        self._data_dir = core.registry.data_dir

    @property
    def system(self) -> SystemStore | None:
        """The node's tenants and keys (after a system restore: the restored ones)."""
        return self._system

    async def _page(self, root: Path, cursor: str | None) -> list[FacetRecord]:
        """The next page of the facets under the tenant directory ``root`` (writer thread)."""
        registry = self._registry
        return await self._run(
            partial(
                list_facets_in, root, start_after=cursor, limit=PAGE, identify=registry.identify
            )
        )

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._core.workers.call(partial(fn, *args))

    async def start(self) -> None:
        """Remove what crashed operations left in ``scratch/``; call before serving."""
        await self._run(clear_scratch, self._data_dir)

    def address(self, tenant: str, agent: str) -> FacetAddress:
        """A validated address of a known tenant.

        Raises:
            AddressError: a malformed id. NotFoundError: the tenant does not exist.
        """
        address = FacetAddress(tenant, agent)
        self._check_tenant(tenant)
        return address

    def _check_tenant(self, tenant: str) -> None:
        validate_tenant_id(tenant)
        if self._system is not None and not self._system.tenant_exists(tenant):
            raise NotFoundError(f"tenant {tenant!r} does not exist")

    # -- listing -------------------------------------------------------------------------

    async def list_facets(
        self, tenant: str, *, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Value]], str | None]:
        """A page of ``tenant``'s facets without opening them; open ones show their live class.

        The directory scan, hint reads and ``stat`` calls run on a writer thread; the live
        classes are read from the router on the loop afterwards.

        Raises:
            NotFoundError: unknown tenant.
        """
        self._check_tenant(tenant)
        records, next_cursor = await self._runtime.list_facets(tenant, cursor=cursor, limit=limit)
        return [self._describe(record) for record in records], next_cursor

    def _describe(self, record: FacetRecord) -> dict[str, Value]:
        live = self._router.live_class(FacetAddress(record.tenant, record.agent))
        return {
            "agent": record.agent,
            "class": live if live is not None else record.class_name,
            "size_bytes": record.size_bytes,
            "last_active": record.last_active,
            "timers": record.timers,
            "open": live is not None,
        }

    async def inspect(self, tenant: str, agent: str) -> dict[str, Value]:
        """``Runtime.inspect`` of a facet of a known tenant.

        Raises:
            NotFoundError: unknown tenant or facet.
        """
        self.address(tenant, agent)
        return await self._runtime.inspect(tenant, agent)

    # -- export and import ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def export(self, tenant: str, agent: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The facet's export (JSON lines, ``_jsonl``) as chunks of bytes, from a snapshot.

        Raises:
            NotFoundError: unknown tenant or facet.
        """
        address = self.address(tenant, agent)
        scratch = await self._run(new_scratch_dir, self._data_dir)
        try:
            await self._snapshot(address, scratch)
            lines = export_lines(scratch, address)
            try:
                yield self._chunks(lines)
            finally:
                lines.close()
        finally:
            with _cleanup_shield():
                await self._run(remove_tree, scratch)

    async def _chunks(self, lines: Iterator[bytes]) -> AsyncIterator[bytes]:
        def take() -> bytes:
            chunk = bytearray()
            for line in lines:
                chunk += line
                if len(chunk) >= EXPORT_CHUNK_BYTES:
                    break
            return bytes(chunk)

        # The generator's read transaction belongs to the copy (private, read-only, no
        # lock file), so moving it between writer threads is harmless.
        while chunk := await self._run(take):
            yield chunk

    async def import_facet(
        self, tenant: str, agent: str, chunks: AsyncIterable[bytes], *, force: bool
    ) -> dict[str, Value]:
        """Build a facet from an export and swap it in; nothing changes unless all is valid.

        Raises:
            BadRequestError: malformed input (the line is named). ConflictError: the facet
            exists and ``force`` is off. NotFoundError: unknown tenant.
        """
        address = self.address(tenant, agent)
        self._refuse_existing(address, force=force)
        config = self._core.config
        scratch = await self._run(new_scratch_dir, self._data_dir)
        try:
            builder = await self._run(
                partial(
                    ImportBuilder,
                    scratch,
                    map_size_bytes=config.map_size_bytes_max,
                    value_bytes_max=config.value_bytes_max,
                )
            )
            try:
                await self._feed(builder, chunks, line_bytes_max(config.value_bytes_max))
                await self._run(builder.finish, address)
            finally:
                await self._run(builder.close)
            summary = await self._run(verify_store, scratch)
            await self._run(fsync_file, scratch / DATA_FILE)
            await self._install(address, scratch, summary.class_name, force=force)
        finally:
            with _cleanup_shield():
                await self._run(remove_tree, scratch)
        return {"agent": agent, "class": summary.class_name, "entries": dict(summary.entries)}

    async def _feed(
        self, builder: ImportBuilder, chunks: AsyncIterable[bytes], line_max: int
    ) -> None:
        splitter = LineSplitter(line_max)
        batch: list[bytes] = []
        size = 0
        first = 1
        async for chunk in chunks:
            for line in splitter.feed(chunk):
                batch.append(line)
                size += len(line)
                if size >= WRITE_BATCH_BYTES:
                    await self._run(builder.write, batch, first)
                    first, batch, size = first + len(batch), [], 0
        batch.extend(splitter.finish())
        if batch:
            await self._run(builder.write, batch, first)

    # -- delete, clone, rebind -----------------------------------------------------------

    async def delete_facet(self, tenant: str, agent: str) -> dict[str, Value]:
        """Remove the facet's store (data, meta, idempotency records, timers) from disk.

        Raises:
            NotFoundError: unknown tenant or facet.
        """
        address = self.address(tenant, agent)
        async with self._router.hold(address):
            removed = await self._run(self._remove, address)
            if removed:
                self._core.quotas.facet_removed(tenant)
        if not removed:
            raise NotFoundError(f"facet {str(address)!r} does not exist")
        return {"agent": agent, "deleted": True}

    async def clone(
        self, tenant: str, agent: str, to_tenant: str, to_agent: str, *, force: bool
    ) -> dict[str, Value]:
        """Copy a facet (every db) to another address, from a snapshot of the source.

        Raises:
            NotFoundError: unknown tenant or source. ConflictError: the target exists and
            ``force`` is off, or is the source. BadRequestError: malformed ids.
        """
        source = self.address(tenant, agent)
        target = self.address(to_tenant, to_agent)
        if source == target:
            raise ConflictError("a facet cannot be cloned onto itself")
        self._refuse_existing(target, force=force)
        scratch = await self._run(new_scratch_dir, self._data_dir)
        try:
            await self._snapshot(source, scratch)
            await self._run(partial(set_identity, scratch, tenant=to_tenant, agent=to_agent))
            summary = await self._run(verify_store, scratch)
            await self._run(fsync_file, scratch / DATA_FILE)
            await self._install(target, scratch, summary.class_name, force=force)
        finally:
            with _cleanup_shield():
                await self._run(remove_tree, scratch)
        return {"agent": to_agent, "tenant": to_tenant, "entries": dict(summary.entries)}

    async def rebind(self, tenant: str, agent: str, cls: str) -> dict[str, Value]:
        """Bind the facet to class ``cls`` (the code-update path); its data is kept.

        Raises:
            NotFoundError: unknown tenant, facet or class.
        """
        address = self.address(tenant, agent)
        if not isinstance(cls, str) or not cls:
            raise BadRequestError("give the class to bind to")
        if self._check_classes and cls not in self._core.classes:
            raise NotFoundError(f"unknown facet class {cls!r}")
        async with self._router.hold(address):
            if not self._registry.exists(address):
                raise NotFoundError(f"facet {str(address)!r} does not exist")
            previous = await self._run(self._rebind_store, address, cls)
        return {"agent": agent, "class": cls, "previous_class": previous}

    def _remove(self, address: FacetAddress) -> bool:
        """Remove the facet's store, then its timer hint (writer thread, under a hold).

        The hint goes only after the store is gone, through ``forget_if_missing`` (which
        checks that inside the index's transaction): a crash in between leaves a hint
        without a store, which the scheduler removes without creating anything. Removing it
        here spares that wake-up, and a tenant delete of many facets spares many.
        """
        path = self._registry.path_of(address)
        removed = remove_store(path, self._data_dir)
        index = self._core.timer_index
        if index.hint_of(address) is not None:
            index.forget_if_missing(address, path)
        return removed

    def _rebind_store(self, address: FacetAddress, cls: str) -> str | None:
        registry = self._registry
        store = registry.open(address)
        try:
            previous = store.hint_fields().get("class")
            store.commit(CommitBatch(system={(META_DB, b"class"): msgpack.packb(cls)}))
        finally:
            registry.close(store, address)
        return previous if isinstance(previous, str) else None

    async def delete_tenant(
        self, tenant: str, progress: Callable[[int, int | None], None] = _no_progress
    ) -> dict[str, Value]:
        """Revoke the tenant's keys, remove it, and wipe every facet it has.

        Keys go first, so no new call of the tenant arrives while its facets are removed. A
        wipe cut short (a crash) is finished by deleting the tenant again.

        Raises:
            NotFoundError: no such tenant and nothing of it on disk.
        """
        validate_tenant_id(tenant)
        root = self._registry.tenant_path(tenant)
        revoked = 0
        try:
            if self._system is None:
                raise NotFoundError(f"tenant {tenant!r} does not exist")
            revoked = await self._run(self._system.delete_tenant, tenant)  # a durable write
        except NotFoundError:
            if not root.exists():
                raise
        deleted = 0
        cursor: str | None = None
        # No message of the tenant may start until the wipe is done: a queued call naming a
        # class, or a facet-to-facet call, would re-create a facet after it.
        self._router.close_tenant(tenant)
        try:
            while page := await self._page(root, cursor):
                for record in page:
                    address = FacetAddress(record.tenant, record.agent)
                    async with self._router.hold(address):
                        if await self._run(self._remove, address):
                            deleted += 1
                    progress(deleted, None)
                cursor = page[-1].cursor
            if not self._router.has_tenant(tenant):
                await self._run(remove_tree, root)
        finally:
            self._router.reopen_tenant(tenant)
        # Its quota overrides went with its record; its facet count is read afresh if a
        # tenant of that name is created again.
        self._core.quotas.forget_tenant(tenant)
        return {"tenant": tenant, "revoked_keys": revoked, "deleted_facets": deleted}

    # -- backup and restore --------------------------------------------------------------

    async def backup(
        self,
        target: Path,
        *,
        tenant: str | None = None,
        agent: str | None = None,
        progress: Callable[[int, int | None], None] = _no_progress,
    ) -> dict[str, Value]:
        """Back up one facet (tenant and agent), a tenant, or the node (neither) to ``target``.

        Each facet is copied from a snapshot while serving, fsynced and verified; the
        manifest is written last. A failure leaves a backup without a manifest (partial).

        Raises:
            ConflictError: ``target`` exists and is not empty. NotFoundError: unknown tenant
            or facet. BadRequestError: an agent without a tenant.
        """
        if agent is not None and tenant is None:
            raise BadRequestError("a facet backup needs its tenant")
        if tenant is not None:
            self._check_tenant(tenant)
        kind = "node" if tenant is None else "tenant" if agent is None else "facet"
        scope: dict[str, object] = {
            "kind": kind,
            "tenant": tenant,
            "agent": agent,
        }
        started = time.perf_counter()
        await self._run(prepare_target, target)
        writer = await self._run(ManifestWriter, target, scope)
        total_bytes = 0
        try:
            # Closed at once however the loop ends (a facet backup of a missing facet
            # raises from inside it): left to the garbage collector, trio warns.
            async with contextlib.aclosing(self._addresses(tenant, agent)) as addresses:
                async for address in addresses:
                    try:
                        entry = await self._backup_one(target, address)
                    except NotFoundError:
                        if agent is not None:
                            raise
                        continue  # deleted since it was listed
                    writer.add(entry)
                    total_bytes += entry.size_bytes
                    progress(writer.facets, 1 if agent is not None else None)
            if tenant is None and self._system is not None:
                total_bytes += await self._backup_system(target, writer)
            await self._run(_fsync_upper_dirs, target)
            await self._run(writer.commit)
        except BaseException:
            writer.abort()
            raise
        await self._run(read_manifest, target)  # read back what was written
        return {
            "path": str(target),
            "scope": kind,
            "facets": writer.facets,
            "bytes": total_bytes,
            "seconds": round(time.perf_counter() - started, 3),
        }

    async def _addresses(
        self, tenant: str | None, agent: str | None
    ) -> AsyncGenerator[FacetAddress, None]:
        if tenant is not None and agent is not None:
            yield FacetAddress(tenant, agent)
            return
        roots = (
            [self._registry.tenant_path(tenant)]
            if tenant is not None
            else await self._run(self._registry.tenant_roots)
        )
        for root in roots:
            cursor: str | None = None
            while page := await self._page(root, cursor):
                for record in page:
                    yield FacetAddress(record.tenant, record.agent)
                cursor = page[-1].cursor

    async def _backup_one(self, target: Path, address: FacetAddress) -> BackupEntry:
        relative = entry_path(address)
        directory = (target / relative).parent
        await self._run(partial(directory.mkdir, mode=0o700, parents=True, exist_ok=True))
        await self._snapshot(address, directory)
        size, digest, class_name = await self._run(seal_copy, target, relative)
        return BackupEntry(
            address=address, class_name=class_name, path=relative, size_bytes=size, sha256=digest
        )

    async def _backup_system(self, target: Path, writer: ManifestWriter) -> int:
        system = self._system
        assert system is not None
        directory = (target / SYSTEM_PATH).parent
        await self._run(partial(directory.mkdir, mode=0o700))
        await self._run(system.copy_to, directory)
        size, digest, _ = await self._run(seal_copy, target, SYSTEM_PATH)
        writer.add_system(size, digest)
        return size

    async def restore(
        self,
        source: Path,
        *,
        tenant: str | None = None,
        agent: str | None = None,
        force: bool = False,
        system: bool = False,
        progress: Callable[[int, int | None], None] = _no_progress,
    ) -> dict[str, Value]:
        """Restore the facets of the backup at ``source`` (or those of one tenant or facet),
        and with ``system`` the system store of a node backup (tenants and hashed keys).

        First every selected copy is checked (checksum, ``lmdb.verify``, timer records) and,
        unless ``force``, every target is checked not to exist: any failure changes nothing.
        Then the system store (if asked) and each facet's copy are staged in ``scratch/``,
        fsynced, checked again and swapped in (facets under a hold).

        The system store is replaced only offline (decision 0008): a daemon serves every
        credential check, its admin key and its tenants' quotas from it.

        Raises:
            BadRequestError: not a backup, a copy is corrupted, or ``system`` with a tenant
            or facet, or with a backup that has no system store. ConflictError: a facet
            exists (or, with ``system``, the system store holds tenants or keys) and
            ``force`` is off; ``system`` while serving. NotFoundError: nothing selected.
        """
        manifest, _ = await self._run(read_manifest, source)
        if system:
            await self._check_system_restore(source, manifest, tenant, agent, force=force)
        total = 0
        async with contextlib.aclosing(self._selected(source, tenant, agent)) as batches:
            async for entries in batches:
                for entry in entries:
                    self._refuse_existing(entry.address, force=force)
                    await self._run(_check_copy_and_timers, source, entry)
                    total += 1
        if total == 0 and not system:
            raise NotFoundError("the backup holds no facet that matches")
        if system:
            await self._restore_system(source, manifest)
        restored = 0
        created: list[str] = []
        async with contextlib.aclosing(self._selected(source, tenant, agent)) as batches:
            async for entries in batches:
                for entry in entries:
                    owner = entry.address.tenant_id
                    if self._system is not None and not self._system.tenant_exists(owner):
                        # A durable write: off the loop. Its keys are not restored.
                        await self._run(self._system.create_tenant, owner)
                        created.append(owner)
                    try:
                        await self._restore_one(source, entry, force=force)
                    except FacetrtError as exc:
                        _note_stop(exc, entry.address, restored, total, created, system)
                        raise
                    except OSError as exc:  # the disk: retryable once there is room
                        error = StorageError(f"cannot restore facet {str(entry.address)!r}: {exc}")
                        _note_stop(error, entry.address, restored, total, created, system)
                        raise error from exc
                    restored += 1
                    progress(restored, total)
        return {
            "path": str(source),
            "facets": restored,
            "system_restored": system,
            "tenants_created": list(created),
            "backup_scope": str(manifest.scope.get("kind")),
        }

    async def _check_system_restore(
        self,
        source: Path,
        manifest: Manifest,
        tenant: str | None,
        agent: str | None,
        *,
        force: bool,
    ) -> None:
        """Everything a system restore needs, checked before anything changes."""
        if not self._offline or self._system is None:
            raise ConflictError(
                "the system store is restored only with the daemon stopped: run "
                "`facetrt restore --system --data-dir DIR` with no daemon on DIR"
            )
        if tenant is not None or agent is not None:
            raise BadRequestError("restore the system store with the whole node, not a part")
        if manifest.system is None:
            raise BadRequestError("the backup holds no system store (only node backups do)")
        current = self._system
        if not force and (current.list_tenants() or current.list_keys()):
            raise ConflictError(
                "the system store holds tenants or keys; pass force to replace them all"
            )
        await self._run(check_system_copy, source, manifest.system)

    async def _restore_system(self, source: Path, manifest: Manifest) -> None:
        """Stage the system copy (fsynced, checksum checked again) and swap it in."""
        system = self._system
        assert system is not None
        assert manifest.system is not None
        digest = manifest.system.get("sha256")
        assert isinstance(digest, str)  # checked by check_system_copy
        scratch = await self._run(new_scratch_dir, self._data_dir)
        try:
            staged = scratch / DATA_FILE
            await self._run(_copy_checked, source / SYSTEM_PATH, staged, digest)
            await self._run(system.replace_data, staged)
        finally:
            with _cleanup_shield():
                await self._run(remove_tree, scratch)
        logger.info("restored the system store from %s", source)

    async def _selected(
        self, source: Path, tenant: str | None, agent: str | None
    ) -> AsyncGenerator[list[BackupEntry], None]:
        """The manifest's entries that match, in batches (bounded memory).

        The manifest is read lazily, a batch per writer-thread job: never on the loop.
        """
        _, entries = await self._run(read_manifest, source)

        def matching() -> Iterator[BackupEntry]:
            for entry in entries:
                if tenant is not None and entry.address.tenant_id != tenant:
                    continue
                if agent is not None and entry.address.agent_id != agent:
                    continue
                yield entry

        iterator = matching()

        def next_batch() -> list[BackupEntry]:
            return [entry for _, entry in zip(range(PAGE), iterator, strict=False)]

        # One job at a time uses the generator (and its open file), so moving it between
        # writer threads is harmless.
        try:
            while batch := await self._run(next_batch):
                yield batch
        finally:
            entries.close()  # the manifest file, now rather than at garbage collection

    async def _restore_one(self, source: Path, entry: BackupEntry, *, force: bool) -> None:
        scratch = await self._run(new_scratch_dir, self._data_dir)
        try:
            await self._run(_copy_checked, source / entry.path, scratch / DATA_FILE, entry.sha256)
            await self._install(entry.address, scratch, entry.class_name, force=force)
        finally:
            with _cleanup_shield():
                await self._run(remove_tree, scratch)

    # -- shared steps --------------------------------------------------------------------

    async def _snapshot(self, address: FacetAddress, directory: Path) -> None:
        """Copy the facet's store into the empty ``directory`` (consistent, while serving)."""
        async with self._router.reading(address) as store:
            await self._run(store.copy_to, directory)

    def _refuse_existing(self, address: FacetAddress, *, force: bool) -> None:
        if not force and (self._registry.exists(address) or self._router.is_active(address)):
            raise ConflictError(f"facet {str(address)!r} exists; pass force to replace it")

    async def _install(
        self, address: FacetAddress, staged: Path, class_name: str | None, *, force: bool
    ) -> None:
        """Swap the verified store in ``staged`` in at ``address`` under a hold, its timers
        registered in the node's timer index (decision 0007: before the store is visible).

        Raises:
            BadRequestError: a timer of the staged store is malformed (nothing installed).
            ConflictError: the facet exists and ``force`` is off.
        """
        await self._run(check_records, staged)
        timers = await self._run(scan_timers, staged)
        hint = {"class": class_name, "timers": timers.count}
        await self._run(write_hint, staged, address, hint)
        async with self._router.hold(address):
            existed = self._registry.exists(address)
            if not force and existed:
                raise ConflictError(f"facet {str(address)!r} exists; pass force to replace it")
            await self._run(self._swap_in, staged, address, timers)
            if not existed:
                # Operators' copies are not refused by the tenant's facet quota (decision
                # 0010), but they count against it from now on.
                self._core.quotas.facet_created(address.tenant_id)
        scheduler = self._core.timer_scheduler
        if timers.earliest_ms is not None and scheduler is not None:
            scheduler.notify(timers.earliest_ms)  # it may sleep until a later hint

    def _swap_in(self, staged: Path, address: FacetAddress, timers: TimerScan) -> None:
        """Install ``staged`` at ``address`` between the two index steps (writer thread).

        The order is the commit's (``commit_with_hints``): *lower* the hint durably before
        the rename makes the store visible, so no crash can leave a store with timers and no
        hint; *settle* it after, to the new store's exact earliest timer (or none), since the
        store replaced may have had an earlier one. The hold makes that exact: no activation
        of the facet can change its timers in between. A failed settle leaves an earlier
        hint, a spurious wake-up at worst, so it does not fail the operation.

        Raises:
            StorageError: the index could not be lowered (nothing installed), or the rename
                failed.
        """
        index = self._core.timer_index
        due_ms = timers.earliest_ms
        hint = index.hint_of(address) if due_ms is None else index.lower(address, due_ms)
        install_store(staged, self._registry.path_of(address))
        if hint == due_ms:
            return  # already exact: no index write
        try:
            index.settle(address, due_ms)
        except StorageError as exc:
            logger.warning("settling the timer hint of %s failed (harmless): %s", address, exc)


def _note_stop(
    error: FacetrtError,
    address: FacetAddress,
    restored: int,
    total: int,
    created: list[str],
    system: bool,
) -> None:
    """Say in ``error`` what a restore that failed on ``address`` after its checks (a copy
    damaged since, a facet created meanwhile, a full disk) had done: that stays done, and the
    operator must know which part it is. Nothing is added when it had done nothing."""
    done = []
    if restored:
        done.append(f"{restored} of {total} facets were restored before it and stay restored")
    if created:
        done.append(f"tenants created: {', '.join(created)}")
    if system:
        done.append("the system store was replaced")
    if done:
        error.message = f"{error.message} (the restore stopped at facet {str(address)!r}: " + (
            "; ".join(done) + ")"
        )
        error.args = (error.message,)


def _fsync_upper_dirs(target: Path) -> None:
    """Fsync the directories above the facet copies once (not once per facet)."""
    tenants = target / "tenants"
    if tenants.is_dir():
        for tenant_dir in tenants.iterdir():
            fsync_dir(tenant_dir / "facets")
            fsync_dir(tenant_dir)
        fsync_dir(tenants)
    fsync_dir(target)


def _check_copy_and_timers(directory: Path, entry: BackupEntry) -> None:
    """``check_copy``, and the copy's timers, meta and idempotency records are well formed:
    a restore refuses a backup with a bad record before it changes anything (not halfway
    through)."""
    check_copy(directory, entry)
    check_records((directory / entry.path).parent)
    scan_timers((directory / entry.path).parent)


def _copy_checked(source: Path, destination: Path, sha256: str) -> None:
    """Copy a backed-up store into place, fsync it and check its checksum once more."""
    shutil.copyfile(source, destination)
    fsync_file(destination)
    if sha256_file(destination) != sha256:
        raise BadRequestError(f"the copy of {source.name} changed while it was restored")
    fsync_dir(destination.parent)


CLEANUP_SECONDS = 30.0


def _cleanup_shield() -> trio.CancelScope:
    # Removing a scratch directory is a writer-thread job (not abandoned); it must run even
    # when the operation was cancelled. Bounded per STYLE §6.5: a removal that has not started
    # within the bound is left to the scratch sweep at the next start.
    return trio.move_on_after(CLEANUP_SECONDS, shield=True)
