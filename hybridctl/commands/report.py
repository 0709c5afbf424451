"""`hybridctl report` (not implemented yet)."""

import typer


def report(args: list[str] = typer.Argument(None)):
    """Not implemented yet."""
    typer.echo("hybridctl report: not implemented yet", err=True)
    raise typer.Exit(2)
