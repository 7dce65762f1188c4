"""`python -m perfit.cli`: the `perfit` command (see `perfit.__main__`)."""

from perfit.cli import app

app()
