"""The response cache: answers of cached contracts, kept while the data versions of their tables are unchanged."""
