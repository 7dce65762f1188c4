"""The package's layering, read from the source: each layer imports only the layers below it.

    presets < config < core < artifacts < client < federation < use < api < bench < cli

`core` (the method) is pure torch; the server side of the federation never imports `perfit.client`
(it holds no data and trains nothing); only the CLI imports the bench."""

import ast
import sys
from pathlib import Path

import pytest

import perfit

PACKAGE = Path(perfit.__file__).parent
ORDER = ["presets", "config", "core", "artifacts", "client", "federation", "use", "api", "bench", "cli"]
SERVER_SIDE = (
    "federation.server_app",
    "federation.updates",
    "federation.evaluation",
    "federation.exchange",
    "federation.roster",
    "federation.run_directory",
    "federation.validation",
)


def _module(path: Path) -> str:
    """`core.search` for perfit/core/search.py, `core` for its __init__, `api` for the package's own
    __init__ (it re-exports the API)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "api"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "perfit":
                found.update(f"perfit.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> str:
    return module.split(".")[0]


MODULES = {_module(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py")) if _module(path) != "__main__"}


def test_every_module_sits_in_a_known_layer():
    assert {_layer(m) for m in MODULES} <= set(ORDER), sorted({_layer(m) for m in MODULES})


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ORDER))
def test_a_module_imports_only_its_own_layer_and_those_below(module):
    own = ORDER.index(_layer(module))
    above = [
        imported
        for imported in MODULES[module]
        if imported.startswith("perfit.") and ORDER.index(_layer(imported.removeprefix("perfit."))) > own
    ]
    assert not above, f"perfit.{module} imports {above} from a layer above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "core"))
def test_core_imports_torch_numpy_and_config_only(module):
    allowed = {"torch", "numpy", "perfit"}
    third_party = {
        name for name in MODULES[module] if name.split(".")[0] not in sys.stdlib_module_names | {"__future__"}
    }
    outside = {n for n in third_party if n.split(".")[0] not in allowed or n.startswith("perfit.")}
    outside -= {n for n in outside if n == "perfit.config" or n.startswith("perfit.core")}
    assert not outside, f"perfit.{module} imports {sorted(outside)}"


@pytest.mark.parametrize("module", SERVER_SIDE)
def test_the_server_side_never_imports_client_code(module):
    client = sorted(n for n in MODULES[module] if n.startswith("perfit.client"))
    assert not client, f"perfit.{module} imports {client}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ("core", "artifacts", "client")))
def test_the_method_and_the_client_work_without_flower(module):
    """Flower's runtime stays in `federation`; the client may use flwr-datasets' partitioners."""
    assert not [n for n in MODULES[module] if n.split(".")[0] in ("flwr", "ray")]


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from perfit.client.data import load_rows\n    import perfit.bench.speed\n")
    assert {"perfit.client.data", "perfit.bench.speed"} <= _imports(bad)
