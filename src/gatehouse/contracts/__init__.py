"""Contracts: the public, versioned shapes of the data."""
