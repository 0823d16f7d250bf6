"""The `lmforge` command: validate manifests, generate CRDs, run jobs locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge import __version__, exitcodes
from lmforge.api.errors import Problem

app = typer.Typer(
    name="lmforge",
    help="Train and compress generative language models, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def print_problems(problems: list[Problem]) -> None:
    """Problems to stderr, one per line, red 'error:' prefix on a terminal."""
    for problem in problems:
        typer.echo(typer.style("error: ", fg="red", bold=True) + str(problem), err=True)


@app.command()
def version() -> None:
    """Print the lmforge version."""
    typer.echo(__version__)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest files (multi-document YAML).")],
) -> None:
    """Check TrainingJob and CompressionJob manifests; print every problem with its field and fix."""
    from lmforge.api.loading import load_manifests

    manifests, problems = load_manifests(list(files))
    if problems:
        print_problems(problems)
        count = len(problems)
        typer.echo(f"{count} problem{'s' if count != 1 else ''} found.", err=True)
        raise typer.Exit(exitcodes.PROBLEMS_FOUND)
    for manifest in manifests:
        typer.echo(f"ok: {manifest.kind} {manifest.metadata.name}")


@app.command()
def crds(
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if the CRD files differ from the models.")
    ] = False,
    root: Annotated[Path, typer.Option(help="Repository root that holds crds/.")] = Path("."),
) -> None:
    """Write crds/*.yaml (and the Helm chart's copy) from the API models."""
    from lmforge.api.crd import stale_crds, write_crds

    if check:
        stale = stale_crds(root)
        if stale:
            for path in stale:
                typer.echo(f"stale: {path}", err=True)
            typer.echo("Run `lmforge crds` and commit the result.", err=True)
            raise typer.Exit(exitcodes.PROBLEMS_FOUND)
        typer.echo("CRDs are up to date.")
        return
    for path in write_crds(root):
        typer.echo(f"wrote {path}")


@app.command(name="exit-codes")
def exit_codes() -> None:
    """List the exit codes lmforge commands use (the operator relies on them)."""
    for code, text in exitcodes.DESCRIPTIONS.items():
        typer.echo(f"{code:>3}  {text}")


if __name__ == "__main__":  # pragma: no cover
    app()
