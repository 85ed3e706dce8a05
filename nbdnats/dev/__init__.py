"""The dev topology: config rendering, accounts, TLS and the processes of `nbd-nats dev`."""
