"""Traffic control: rate limits per application and grant, and admission of an app's requests in flight."""
