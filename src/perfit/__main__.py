"""`python -m perfit`: the `perfit` command, for a machine where the package is on the path but not
installed (a GPU machine the device tool lends, say: `PYTHONPATH=src python3 -m perfit ...`)."""

from perfit.cli import app

app(prog_name="perfit")
