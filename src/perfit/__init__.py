"""perfit: Personalized Federated Instruction Tuning (PerFIT) and FIT on Flower.

`perfit.run`, `perfit.load_client_model`, `perfit.join` and `perfit.export_client` are the Python
API (see `perfit.api`); they are imported on first use so that `import perfit.config` stays light.
"""

from typing import Any

_API = ("Config", "check_inputs", "export_client", "join", "load_client_model", "make_config", "run")


def __getattr__(name: str) -> Any:
    if name in _API:
        from perfit import api

        return getattr(api, name)
    raise AttributeError(f"module 'perfit' has no attribute {name!r}")


__all__ = list(_API)
