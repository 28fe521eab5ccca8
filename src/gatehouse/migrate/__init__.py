"""Versioned SQL migrations."""
