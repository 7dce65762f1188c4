"""`python -m perfit`: the `perfit` command, for a machine where the package is on the path but not
installed (a machine with the source tree only, say: `PYTHONPATH=src python3 -m perfit ...`)."""

from perfit.cli import app

app(prog_name="perfit")
