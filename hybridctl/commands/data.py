"""`hybridctl data` (not implemented yet)."""

import typer

app = typer.Typer(help="Not implemented yet.", invoke_without_command=True)


@app.callback()
def main():
    """Not implemented yet."""
    typer.echo("hybridctl data: not implemented yet", err=True)
    raise typer.Exit(2)
