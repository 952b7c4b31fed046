from infl.cli import app

app(prog_name="infl")
