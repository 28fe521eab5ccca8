"""gatehouse: the API layer between many applications and their databases."""

from gatehouse.logic.registry import rpc

__version__ = "0.1.0"
__all__ = ["__version__", "rpc"]
