"""``mpo postprocess ...``: argument parsing only; the work is ``mpo.generate.postprocess.run_postprocess``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Turn sampled responses into preference pairs."""


@app.command()
def correctness(
    data_dir: Path = typer.Option(..., "--data-dir", help="Folder of Stage-1 *.jsonl files (one dataset each)."),
    save_dir: Path = typer.Option(..., "--save-dir", help="Output folder: raw/, pos_items/, neg_items/, manifest.json."),
    answer_fix: bool = typer.Option(False, "--answer-fix", help="Rewrite the final answer of *correct* option "
                                    "responses to the bare letter; the rewrite is re-judged and kept only if correct."),
    force: bool = typer.Option(False, "--force", help="Add --gt-responses positives to every question, not only "
                               "to questions without model positives (no effect without --gt-responses)."),
    gt_responses: Path | None = typer.Option(None, "--gt-responses", help="JSONL of reference responses "
                                              "(Stage-1 schema), judged like the samples; positives are added."),
    num_pairs_per_key: int = typer.Option(15, "--num-pairs-per-key", help="At most this many pairs per question "
                                          "and rule (correctness, format)."),
    max_lines: int = typer.Option(1_000_000, "--max-lines", help="Use only the first N lines of each file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute datasets the manifest lists as done, and "
                                   "replace existing output files it does not list (never an input file)."),
    workers: int = typer.Option(2, "--workers", help="Processes that judge in parallel."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds allowed per math-verify comparison."),
) -> None:
    """Judge sampled responses and build chosen/rejected pairs (InternVL MMPR layout)."""
    from mpo.generate.postprocess import (  # lazy: keeps `mpo --help` fast
        ManifestConflict,
        OutputPathError,
        PostprocessConfig,
        run_postprocess,
    )

    try:
        cfg = PostprocessConfig(data_dir=data_dir, save_dir=save_dir, answer_fix=answer_fix, force=force,
                                gt_responses=gt_responses, num_pairs_per_key=num_pairs_per_key,
                                max_lines=max_lines, overwrite=overwrite, workers=workers, timeout=timeout)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    try:
        run_postprocess(cfg, log=typer.echo)
    except (ManifestConflict, OutputPathError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
