"""Databases: embedded server, connections, pools, catalog, and making the database match the project."""
