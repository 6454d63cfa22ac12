"""System store writes under kills: tenant keys created and revoked through the admin HTTP API.

During each cycle of the daemon crash loop an :class:`AdminWriter` thread keeps creating keys
for the test tenant (``POST /v1/admin/tenants/{t}/keys``) and revoking some of those it created
(``DELETE /v1/admin/keys/{id}``), until the daemon is killed under it. Each is a write
transaction of the daemon's system store, so kills land in them too. :class:`KeyExpectation`
then checks the key listing after the restart:

* every key whose creation was acknowledged (201) is listed, and active unless a revocation of
  it was attempted; every acknowledged revocation holds: a revoked key that came back to life
  would let a client in that an operator shut out;
* the listing holds no key beyond those, the keys made before the run, and at most one per
  creation whose reply never came (its id is unknown).

A request that could not connect did not happen; one that connected but got no answer (the kill)
has an unknown outcome; an HTTP error answer (4xx, 5xx) means nothing changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import httpx

from tests.crash.expected import Findings

if TYPE_CHECKING:
    import random
    from collections.abc import Iterable

PAUSE_SECONDS: Final = (0.005, 0.05)  # between two requests
REQUEST_SECONDS: Final = 10.0
REVOKE_FRACTION: Final = 0.3


@dataclass(slots=True)
class KeyExpectation:
    """Key creations and revocations recorded, and what the listing must show."""

    tenant: str
    initial: set[str] = field(default_factory=set)  # listed before the run
    created: set[str] = field(default_factory=set)  # acknowledged creations
    created_unknown: int = 0
    revoked: set[str] = field(default_factory=set)  # acknowledged revocations
    revoking: set[str] = field(default_factory=set)  # revocations attempted, any outcome

    @property
    def acknowledged(self) -> int:
        return len(self.created) + len(self.revoked)

    def active(self) -> list[str]:
        """Created keys no revocation was attempted on: candidates to revoke."""
        return sorted(self.created - self.revoking)

    def check(self, listing: Iterable[dict[str, object]]) -> Findings:
        findings = Findings()
        listed = {str(key["key_id"]): key.get("revoked") is not None for key in listing}
        missing = sorted(self.created - set(listed))
        if missing:
            findings.lose(len(missing), f"keys acknowledged as created are gone: {missing[:5]}")
        back = sorted(key for key in self.revoked if key in listed and not listed[key])
        if back:
            findings.lose(len(back), f"keys acknowledged as revoked are active: {back[:5]}")
        revoked = sorted(key for key in self.created - self.revoking if listed.get(key))
        if revoked:
            findings.problems.append(f"keys nobody revoked are revoked: {revoked[:5]}")
        strangers = set(listed) - self.initial - self.created
        if len(strangers) > self.created_unknown:
            findings.problems.append(
                f"{len(strangers)} keys nobody knows of, for {self.created_unknown} creations "
                f"without a reply: {sorted(strangers)[:5]}"
            )
        return findings


class AdminWriter(threading.Thread):
    """Creates and revokes keys until :meth:`stop`; records outcomes in ``keys``."""

    def __init__(self, url: str, admin_key: str, keys: KeyExpectation, rng: random.Random) -> None:
        super().__init__(name="admin-writer", daemon=True)
        self.url = url
        self.admin_key = admin_key
        self.keys = keys
        self.rng = rng
        self.requests = 0  # sent, whatever their outcome
        self.unknown = 0  # of them, without an answer
        self._stopping = threading.Event()
        self._finished = False

    def stop(self) -> None:
        """Stop after the request in flight, and wait for it.

        Raises:
            RuntimeError: the thread failed (its traceback went to stderr).
        """
        self._stopping.set()
        self.join()
        if not self._finished:
            raise RuntimeError("the admin writer failed; see its traceback on stderr")

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_SECONDS) as http:
            while not self._stopping.wait(self.rng.uniform(*PAUSE_SECONDS)):
                self._one(http)
        self._finished = True

    def _one(self, http: httpx.Client) -> None:
        keys = self.keys
        active = keys.active()
        revoke = active and self.rng.random() < REVOKE_FRACTION
        key_id = self.rng.choice(active) if revoke else None
        try:
            if key_id is None:
                response = http.post(f"/v1/admin/tenants/{keys.tenant}/keys")
            else:
                keys.revoking.add(key_id)
                response = http.delete(f"/v1/admin/keys/{key_id}")
        except httpx.ConnectError:
            return  # never sent: the daemon is down
        except httpx.TransportError:
            # Sent, no answer: unknown outcome.
            self.requests += 1
            self.unknown += 1
            keys.created_unknown += key_id is None
            return
        self.requests += 1
        if key_id is None and response.status_code == 201:
            keys.created.add(str(response.json()["key_id"]))
        elif key_id is not None and response.status_code == 200:
            keys.revoked.add(key_id)
        else:
            raise AssertionError(f"unexpected answer {response.status_code}: {response.text}")


def list_keys(url: str, admin_key: str, tenant: str) -> list[dict[str, object]]:
    """The tenant's keys, as the admin API lists them."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    response = httpx.get(
        f"{url}/v1/admin/tenants/{tenant}/keys", headers=headers, timeout=REQUEST_SECONDS
    )
    response.raise_for_status()
    keys = response.json()["keys"]
    assert isinstance(keys, list)
    return keys
