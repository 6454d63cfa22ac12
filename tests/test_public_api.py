"""The public API: sorted, complete ``__all__``; no private types in public signatures."""

from __future__ import annotations

import inspect

import facetrt
import facetrt.client
import facetrt.policy
import facetrt.protocol
import facetrt.runtime
import facetrt.storage
import facetrt.testing


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_complete() -> None:
    modules = (
        facetrt,
        facetrt.client,
        facetrt.policy,
        facetrt.protocol,
        facetrt.runtime,
        facetrt.storage,
        facetrt.testing,
    )
    for module in modules:
        names = module.__all__
        assert names == sorted(names, key=_isort_key), module.__name__
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
        }
        assert set(names) == public, module.__name__


def test_every_public_error_has_a_docstring_and_code() -> None:
    for name in facetrt.__all__:
        value = getattr(facetrt, name)
        if isinstance(value, type) and issubclass(value, facetrt.FacetrtError):
            assert value.__doc__, name
            assert isinstance(value.code, facetrt.ErrorCode)


def test_public_signatures_mention_no_private_types() -> None:
    for name in ("open_runtime", "Runtime", "Facet", "Storage", "FacetCalls"):
        value = getattr(facetrt, name)
        members = (
            [value]
            if not isinstance(value, type)
            else [member for attr, member in vars(value).items() if not attr.startswith("_")]
        )
        for member in members:
            if callable(member):
                text = str(inspect.signature(member))
                assert "._" not in text.replace("facetrt._values.Value", ""), (name, text)
