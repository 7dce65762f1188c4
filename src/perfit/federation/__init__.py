"""The Flower glue: the ClientApp (thin, over `client.task`), the ServerApp (sampling, payloads, Eq. 6,
evaluation; it never imports `perfit.client`), the checks on every reply, the run directory and the
simulation engine's entry point."""
