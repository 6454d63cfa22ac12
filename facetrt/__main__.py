"""``python -m facetrt`` is the ``facetrt`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
