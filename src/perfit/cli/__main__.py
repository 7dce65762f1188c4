from perfit.cli import app

app()
