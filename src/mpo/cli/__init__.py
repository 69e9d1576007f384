"""The ``mpo`` command line. Each sub-module parses arguments and calls one ``run_*`` function: no logic here."""

from __future__ import annotations

import typer

from mpo.cli import data, generate, models, postprocess, train

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Mixed Preference Optimization for VLMs.")
app.add_typer(data.app, name="data", help="Check and build MMPR-style preference data.")
app.add_typer(models.app, name="models", help="Build tiny models; inspect checkpoints.")
app.add_typer(generate.app, name="generate", help="Generate preference data: dropout-ntp, correctness.")
app.add_typer(postprocess.app, name="postprocess", help="Turn sampled responses into preference pairs.")
app.command("train")(train.train)
app.command("config-help")(train.config_help)
app.command("eval")(train.eval_)
app.command("demo")(train.demo)
app.command("precompute-ref")(train.precompute_ref)


def main() -> None:  # pragma: no cover - entry point
    app()
