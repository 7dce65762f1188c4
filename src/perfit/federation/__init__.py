"""The Flower glue: the ClientApp (thin, over `client.task`), the ServerApp (phases, sampling, payloads;
it never imports `perfit.client`) with its train rounds' checks and Eq. 6 (`updates`) and its
evaluations (`evaluation`), the checks on every reply (`validation`), the run
directory and the simulation engine's entry point. On the Deployment Engine: the server's message
exchange with the nodes (`exchange`), its roster of the owners' nodes (`roster`), the node's message
handlers (`handlers`), its long-lived worker (`node_worker`) and what it keeps on disk between
messages and restarts (`node_store`)."""
