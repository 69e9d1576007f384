"""``mpo models ...``: argument parsing only."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("tiny")
def tiny(
    out: Path = typer.Argument(..., help="Folder to write: new, empty, or an earlier `mpo models tiny` model "
                                         "(replaced; through a symbolic link, the folder it points to); any "
                                         "other folder is refused."),
    arch: str = typer.Option("internvl", "--arch", help="internvl | qwen2_5_vl | qwen2 (text-only)."),
    corpus: list[Path] = typer.Option([], "--corpus", exists=True, dir_okay=False,
                                      help="Extra tokenizer text: .txt lines or .jsonl string fields (repeatable)."),
    image_size: int = typer.Option(64, "--image-size", min=8, help="Tile side (InternVL) / largest image side."),
    patch_size: int = typer.Option(8, "--patch-size", min=1, help="ViT patch side in pixels."),
    max_patches: int = typer.Option(12, "--max-patches", min=1, help="InternVL: default tile cap per image."),
    vocab_size: int = typer.Option(2048, "--vocab-size", min=300, help="BPE vocabulary target."),
    seed: int = typer.Option(0, "--seed", help="Same seed and corpus, same weights and tokenizer."),
) -> None:
    """Build a tiny random-weight model with a trained tokenizer and the real processor, loadable by path."""
    from mpo.models import build_tiny, read_corpus

    try:
        # stdout holds the path alone (M=$(mpo models tiny DIR)); save_pretrained imports DeepSpeed where it is
        # installed, and DeepSpeed's logger writes to stdout
        with contextlib.redirect_stdout(sys.stderr):
            path = build_tiny(out, arch, corpus=read_corpus(corpus), image_size=image_size, patch_size=patch_size,
                              max_patches=max_patches, vocab_size=vocab_size, seed=seed)
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@app.command("info")
def info(
    path: str = typer.Argument(..., help="Model folder or Hugging Face Hub id."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Family, parameter count, image tokens per tile and chat template of a checkpoint (no weights read)."""
    from mpo.models import ModelLoadError, model_info

    try:
        result = model_info(path, trust_remote_code=trust_remote_code)
    except ModelLoadError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key}: {value}")
