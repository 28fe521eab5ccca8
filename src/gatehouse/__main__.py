from gatehouse.cli import app

app()
