"""``mpo data ...``: argument parsing only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("check")
def check(
    meta: Path = typer.Argument(..., help="The meta JSON file listing the datasets."),
    model: Path | None = typer.Option(None, "--model", help="Model or processor folder: also plan token lengths."),
    max_length: int | None = typer.Option(None, "--max-length", min=1, help="Count pairs longer than this."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes checking chunks of rows."),
    max_dynamic_patch: int = typer.Option(12, "--max-dynamic-patch", min=1,
                                          help="Global tile budget (a dataset's max_dynamic_patch overrides it)."),
    system_prompt: str = typer.Option("auto", "--system-prompt", help="With --model: the run's data.system_prompt, "
                                      "auto | none | text (auto: InternVL's identity line for InternVL)."),
    max_image_pixels: int | None = typer.Option(None, "--max-image-pixels", min=0, show_default=False,
                                                help="Decompression-bomb limit: an image with more pixels is a row "
                                                     "error (the run's data.max_image_pixels; default 178,956,970, "
                                                     "PIL's; 0 = no limit)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Validate every dataset, row and image of META. Exit 0: no error; 1: bad rows or datasets; 2: bad META."""
    from mpo.data.check import run_check
    from mpo.data.images import DEFAULT_MAX_PIXELS

    if not system_prompt.strip():
        typer.echo("--system-prompt is empty: give the text, 'none' (no system turn) or 'auto'", err=True)
        raise typer.Exit(2)
    processor = None
    if model is not None:
        try:
            from mpo.models import load_processor

            processor = load_processor(model)
        except Exception as exc:  # any failure to load the model is a usage error, not a data error
            typer.echo(f"--model {model}: cannot load the processor: {exc}", err=True)
            raise typer.Exit(2) from None
    report = run_check(meta, processor=processor, max_length=max_length, workers=workers,
                       max_dynamic_patch=max_dynamic_patch, system_prompt=system_prompt,
                       max_image_pixels=DEFAULT_MAX_PIXELS if max_image_pixels is None else max_image_pixels,
                       progress=progress)
    if as_json:
        typer.echo(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(report.exit_code)


@app.command("demo")
def demo(
    out: Path = typer.Argument(..., help="Folder to write (new, empty, or an earlier demo: it is "
                                         "replaced; through a symbolic link, the folder it points to)."),
    n: int = typer.Option(2000, "--n", min=3, help="Training pairs (60% single image, 25% two images, 15% text)."),
    n_heldout: int = typer.Option(200, "--n-heldout", min=1, help="Held-out pairs per subset."),
    n_prompts: int = typer.Option(32, "--n-prompts", min=1, help="Prompts per data-generation file."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
) -> None:
    """Write a synthetic visual preference dataset in the MMPR layout (meta.json, annotations/, images/)."""
    from mpo.data.demo import write_demo

    try:
        paths = write_demo(out, n=n, n_heldout=n_heldout, n_prompts=n_prompts, seed=seed)
    except (FileExistsError, NotADirectoryError) as exc:  # a path the demo must not replace: one line, exit 2
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
