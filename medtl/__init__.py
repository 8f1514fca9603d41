"""medtl: plugin-based transfer learning and cross-site evaluation for medical images."""

from __future__ import annotations

from typing import Any

import pluggy

__version__ = "0.1.0"

#: Marker for hook implementations, used by builtin and third-party plugins alike.
hookimpl = pluggy.HookimplMarker("medtl")

from medtl._host import ENTRY_POINT_GROUP, KINDS, PluginHost, get_host, set_host  # noqa: E402

__all__ = [
    "__version__",
    "hookimpl",
    "create",
    "components",
    "get_host",
    "set_host",
    "PluginHost",
    "ENTRY_POINT_GROUP",
    "KINDS",
]


def create(kind: str, name: str, **options: Any) -> Any:
    """Build a registered component.

    Args:
        kind: one of ``source``, ``transform``, ``backbone``, ``pooling``, ``strategy``,
            ``metric`` and ``validator``.
        name: the component's registered name, for example ``"resnet18"``.
        **options: passed to the component's factory.

    Raises:
        UnknownComponentError: the name is not registered; the message suggests the
            closest name and lists the valid ones.
    """
    return get_host().create(kind, name, **options)


def components(kind: str) -> list[str]:
    """List the registered names of one component kind."""
    return get_host().components(kind)
