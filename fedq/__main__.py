"""`python -m fedq` runs the CLI (same as the `fedq` script)."""

from fedq.cli import app

app(prog_name="fedq")
