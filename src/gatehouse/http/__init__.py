"""HTTP surface: routing, request parsing, responses."""
