"""PostgREST query grammar to a query tree to SQL."""
