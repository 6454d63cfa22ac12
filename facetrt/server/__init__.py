"""The daemon: trio I/O adapters (TCP protocol, HTTP gateway) and the composition root."""

from __future__ import annotations
