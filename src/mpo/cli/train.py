"""``mpo train``, ``mpo eval``, ``mpo demo``: argument parsing only."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import typer

from mpo.config import ConfigError, describe, load_config


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def train(
    config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-6"),
    resume: bool = typer.Option(False, "--resume", help="Restart from the newest complete checkpoint."),
) -> None:
    """Train with MPO: 0.8·DPO + 0.2·BCO-pair(δ) + 1.0·SFT against a frozen reference."""
    from mpo.train.accelerator import end_distributed
    from mpo.train.config import RunConfig
    from mpo.train.recipe import TrainingError, run_train

    _logging()
    try:
        cfg = load_config(RunConfig, config, overrides or [])
        result = run_train(cfg, resume=resume, config_path=config)
    except (ConfigError, TrainingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    end_distributed()
    typer.echo(f"done: {result.steps} steps in {result.train_seconds:.1f} s; model in {result.output_dir / 'final'}")


def config_help() -> None:
    """List every config key with its default and meaning."""
    from mpo.train.config import RunConfig

    for key, default, text in describe(RunConfig):
        typer.echo(f"{key:38s} {default:28s} {text}")


def eval_(
    model: str = typer.Option(..., "--model", help="Model folder, or a training output folder."),
    meta: Path = typer.Option(..., "--meta", help="Held-out meta.json."),
    reference: str = typer.Option(None, "--reference", help="Reference model (default: the run's base model)."),
    beta: float = typer.Option(None, help="β of the implicit reward (default: the run's loss.beta, else 0.1)."),
    batch_size: int = typer.Option(8, min=1, help="Pairs per forward."),
    max_length: int = typer.Option(None, min=1, help="Longer pairs are skipped and reported (default: the run's "
                                   "data.max_length, else 16384)."),
    max_dynamic_patch: int = typer.Option(None, min=1, help="Tile budget per row (default: the run's "
                                          "data.max_dynamic_patch, else 12)."),
    blank_images: bool = typer.Option(False, "--blank-images", help="Replace every image by a white one (ablation)."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="auto | none | text (default: the run's "
                                      "data.system_prompt, else auto: InternVL's identity line for InternVL)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Held-out preference accuracy: log-prob and implicit-reward, per dataset and overall."""
    from mpo.data.errors import DataError
    from mpo.train.evaluate import run_eval

    try:  # a model or meta file that cannot be used: one line, exit 2 (ModelLoadError is a ValueError)
        report = run_eval(model, str(meta), reference=reference, beta=beta, batch_size=batch_size,
                          max_length=max_length, max_dynamic_patch=max_dynamic_patch, blank_images=blank_images,
                          trust_remote_code=trust_remote_code, system_prompt=system_prompt)
    except (DataError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, model, run and report."),
    steps: int = typer.Option(None, min=1, help="Override the demo's optimizer steps."),
) -> None:
    """Embedded demo: synthetic visual preference data → tiny InternVL → MPO on CPU → before/after table."""
    from mpo.train.demo import run_demo

    _logging()
    try:
        run_demo(out, steps=steps)
    except (FileExistsError, NotADirectoryError) as exc:  # a folder the demo must not replace: one line, exit 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def precompute_ref(
    config: Path = typer.Argument(..., help="The run config YAML the cache is for."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.ref_cache=cache/"),
    batch_size: int = typer.Option(8, min=1, help="Pairs per reference forward."),
) -> None:
    """Compute the reference log-probs of every training pair once (resumable); then train with train.ref_cache."""
    from mpo.data.errors import DataError
    from mpo.train.accelerator import end_distributed
    from mpo.train.config import RunConfig
    from mpo.train.precompute import run_precompute
    from mpo.train.refcache import RefCacheError

    _logging()
    try:
        cfg = load_config(RunConfig, config, overrides or [])
        out = run_precompute(cfg, batch_size=batch_size)
    except (ConfigError, RefCacheError, DataError, ValueError) as exc:  # incl. ModelLoadError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    end_distributed()
    again = [o for o in overrides or [] if not o.startswith("train.ref_cache=")] + [f"train.ref_cache={out}"]
    typer.echo(f"reference cache: {out}  (train with: mpo train {shlex.join([str(config), *again])})")
