"""The ``mpo`` command line. Each sub-module parses arguments and calls one ``run_*`` function: no logic here."""

from __future__ import annotations

import typer

from mpo.cli import data, models

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Mixed Preference Optimization for VLMs.")
app.add_typer(data.app, name="data", help="Check and build MMPR-style preference data.")
app.add_typer(models.app, name="models", help="Build tiny models; inspect checkpoints.")


def main() -> None:  # pragma: no cover - entry point
    app()
