"""gatehouse: the API layer between many applications and their databases."""

from gatehouse.logic.registry import rpc
from gatehouse.sagas.declare import RemoteCall, saga, step
from gatehouse.sagas.replay import Saga

__version__ = "0.1.0"
__all__ = ["RemoteCall", "Saga", "__version__", "rpc", "saga", "step"]
