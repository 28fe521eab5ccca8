"""Change events: the outbox written with every change of an evented contract's rows, the relay that publishes
it to brokers and webhooks, the HTTP feed, and mirrors kept from it (DESIGN.md §7, issue 17)."""
