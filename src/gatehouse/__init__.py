"""gatehouse: the API layer between many applications and their databases.

What a project's ``logic/`` imports from here (``rpc``, ``saga``, ``step``, ``Saga``, ``RemoteCall``) is loaded on
first use, not with the package: a saga's declarations pull in the engine that runs them, and every ``gatehouse``
command, ``--help`` included, would otherwise pay for that before it starts.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gatehouse.logic.registry import rpc
    from gatehouse.sagas.declare import RemoteCall, saga, step
    from gatehouse.sagas.replay import Saga

__version__ = "0.1.0"
__all__ = ["RemoteCall", "Saga", "__version__", "rpc", "saga", "step"]

_PUBLIC = {"rpc": "gatehouse.logic.registry", "saga": "gatehouse.sagas.declare", "step": "gatehouse.sagas.declare",
           "RemoteCall": "gatehouse.sagas.declare", "Saga": "gatehouse.sagas.replay"}


def __getattr__(name: str) -> object:
    """The public names above, imported when first asked for (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gatehouse' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
