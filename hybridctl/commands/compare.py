"""`hybridctl compare` (not implemented yet)."""

import typer


def compare(args: list[str] = typer.Argument(None)):
    """Not implemented yet."""
    typer.echo("hybridctl compare: not implemented yet", err=True)
    raise typer.Exit(2)
