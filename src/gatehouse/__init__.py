"""gatehouse: the API layer between many applications and their databases."""

__version__ = "0.1.0"
