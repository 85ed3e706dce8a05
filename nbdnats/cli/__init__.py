"""The command line, ``nbd-nats``: ``main`` parses and dispatches; one module per command group.

Feature parts never import this package; it imports them."""
