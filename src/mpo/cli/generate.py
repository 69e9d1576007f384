"""``mpo generate ...``: argument parsing only; each command builds its config and calls one ``run_*`` function.

Flag names and defaults follow the seed (InternVL ``mmpr_data_pipeline_*.py``); see ``docs/generate.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)

# Options shared by both commands: (default, help). Defaults that differ per command are given there.
_CHECKPOINT = typer.Option(..., "--checkpoint", help="Model folder (or cached Hub id).")
_PROMPTS = typer.Option(..., "--prompt-path", help="Prompt JSONL file.")
_OUT = typer.Option("sampled_outputs", "--out-dir", help="Output root.")
_BACKEND = typer.Option("hf", "--backend", help="hf (transformers) or vllm.")
_DTYPE = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
_DEVICE = typer.Option("auto", "--device", help="hf backend: auto, cpu, cuda, cuda:N.")
_TP = typer.Option(1, "--tp", help="Tensor-parallel size (vllm).")
_BATCH = typer.Option(1, "--batch-size", help="Prompts per sampler call.")
_WORKERS = typer.Option(8, "--num-workers", help="Threads decoding images ahead of the sampler.")
_TOP_K = typer.Option(50, "--top-k", help="0 keeps every token.")
_TOP_P = typer.Option(1.0, "--top-p")
_TEMP = typer.Option(0.7, "--temperature")
_DYNAMIC = typer.Option(False, "--dynamic", help="Tile images (InternVL): up to --max-num tiles plus a thumbnail.")
_MAX_NUM = typer.Option(6, "--max-num", help="Tile cap per prompt.")
_SAMPLE_MAX = typer.Option(None, "--sample-max-num", help="Cap the number of prompts (strided subsample).")
_SEED = typer.Option(0, "--seed", help="Run seed; every sample's seed derives from it and the item id.")
_IMAGE_ROOT = typer.Option(None, "--image-root", help="Folder relative image paths start from "
                                                       "(default: the prompt file's folder).")
_OUTSIDE = typer.Option(False, "--allow-outside-root", help="Accept absolute image paths and paths outside the root.")
_REMOTE = typer.Option(False, "--trust-remote-code", help="Run code shipped with the checkpoint.")
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
_SYSTEM = typer.Option("auto", "--system-prompt", help="System message: auto (InternVL: its identity line, as lmdeploy "
                                                        "writes it; other models: their template's), none, or the text.")


@app.command("correctness")
def correctness(
    checkpoint: str = _CHECKPOINT, prompt_path: str = _PROMPTS, out_dir: str = _OUT, backend: str = _BACKEND,
    dtype: str = _DTYPE, device: str = _DEVICE, tp: int = _TP, batch_size: int = _BATCH, num_workers: int = _WORKERS,
    num_return_sequences: int = typer.Option(32, "--num-return-sequences", help="Samples per prompt."),
    top_k: int = _TOP_K, top_p: float = _TOP_P, temperature: float = _TEMP,
    max_new_tokens: int = typer.Option(4096, "--max-new-tokens"),
    dynamic: bool = _DYNAMIC, max_num: int = _MAX_NUM, sample_max_num: int | None = _SAMPLE_MAX,
    seed: int = _SEED,
    prompt_version: str = typer.Option("en_v2", "--prompt-version", help="en, zh, en_v2, zh_v2, en_r1 or zh_r1."),
    image_root: str | None = _IMAGE_ROOT, allow_outside_root: bool = _OUTSIDE,
    trust_remote_code: bool = _REMOTE, system_prompt: str = _SYSTEM, progress: bool = _PROGRESS,
) -> None:
    """Sample N chain-of-thought responses per prompt (to be paired by answer correctness)."""
    flags = dict(locals())  # first statement: exactly the parameters
    from mpo.generate.correctness import CorrectnessConfig, run_correctness

    _report(_run(run_correctness, _config(CorrectnessConfig, flags)))


@app.command("dropout-ntp")
def dropout_ntp(
    checkpoint: str = _CHECKPOINT, prompt_path: str = _PROMPTS, out_dir: str = _OUT, backend: str = _BACKEND,
    dtype: str = _DTYPE, device: str = _DEVICE, tp: int = _TP, batch_size: int = _BATCH, num_workers: int = _WORKERS,
    num_return_sequences: int = typer.Option(1, "--num-return-sequences", help="Rejected answers per row."),
    top_k: int = _TOP_K, top_p: float = _TOP_P, temperature: float = _TEMP,
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens"),
    dynamic: bool = _DYNAMIC, max_num: int = _MAX_NUM, sample_max_num: int | None = _SAMPLE_MAX,
    seed: int = _SEED,
    start_ratio: float = typer.Option(0.5, "--start-ratio", help="Share of chosen's words kept as the prefix."),
    image_root: str | None = _IMAGE_ROOT, allow_outside_root: bool = _OUTSIDE,
    trust_remote_code: bool = _REMOTE, system_prompt: str = _SYSTEM, progress: bool = _PROGRESS,
) -> None:
    """Continue the first --start-ratio of each chosen answer without the image: the rejected answer."""
    flags = dict(locals())  # first statement: exactly the parameters
    from mpo.generate.dropout_ntp import DropoutNTPConfig, run_dropout_ntp

    _report(_run(run_dropout_ntp, _config(DropoutNTPConfig, flags)))


def _config(cls: type, values: dict[str, Any]) -> Any:
    """Validate the flags through ``mpo.config.build``; a bad value exits with its flag name."""
    from mpo.config import ConfigError, build

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = build(cls, values)
        cfg.check_paths()
        cfg.check_backend()
        cfg.check_checkpoint()
    except (ConfigError, ValueError) as err:
        key, sep, rest = str(err).partition(": ")
        raise typer.BadParameter(f"--{key.replace('_', '-')}: {rest}" if sep and key in values else str(err)) from None
    return cfg


def _run(run: Callable[[Any], Any], cfg: Any) -> Any:
    """Run one generator; an output that cannot be resumed, an output path that would replace the prompt file or
    runs through a regular file, a damaged part file or a model that does not load is one line on stderr and exit
    code 2 (the message names the file and what to do), not a traceback."""
    from mpo.generate.outpaths import OutputPathError
    from mpo.generate.sharding import PartFileError, ResumeError
    from mpo.models import ModelLoadError

    try:
        return run(cfg)
    except (ResumeError, PartFileError, ModelLoadError, OutputPathError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _report(result: Any) -> None:
    where = result.output if result.output else "(not merged yet: other ranks are still running)"
    typer.echo(f"rank {result.rank}/{result.world}: {result.generated} samples in {result.seconds:.1f} s; "
               f"output: {where}")
