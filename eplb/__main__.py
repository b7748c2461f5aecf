"""`python -m eplb`: see `eplb.cli`."""

from eplb.cli import cli

if __name__ == "__main__":
    cli()
