from mpo.cli import app

app()
