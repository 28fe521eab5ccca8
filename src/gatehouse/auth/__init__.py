"""Who is calling: API keys and identities."""
