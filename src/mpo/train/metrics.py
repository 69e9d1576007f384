"""Where logged metrics go: the console, ``<output_dir>/metrics.jsonl`` (always), and ``report_to`` backends.

Each loss term is logged raw and weighted (``loss/sft`` and ``loss/sft_weighted``): InternVL's users were puzzled
that the total starts near 1.5–2 even for a converged model (OpenGVLab/InternVL#1087) — that is the SFT term, a
token-mean NLL, which the DPO and BCO terms (≈ 0.55 and 0.28 weighted at step 0) do not dominate.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpo.config import ConfigError

__all__ = ["MetricsLogger", "CONSOLE_KEYS", "LogWindow"]

log = logging.getLogger("mpo.train")

CONSOLE_KEYS = ("loss", "loss/sigmoid_weighted", "loss/bco_pair_weighted", "loss/sft_weighted", "rewards/accuracies",
                "rewards/margins", "delta", "grad_norm", "lr", "pairs_per_s")


METRICS_FILE = "metrics.jsonl"


@dataclass
class LogWindow:
    """The optimizer steps since the last log line. A line reports their mean per pair (and their throughput), as
    HF's Trainer and TRL average the steps since the last log; it used to show the last step alone, so with
    ``logging_steps: 10`` nine steps in ten were never seen. ``sums`` are pair-weighted metric sums."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, sums: dict[str, float], pairs: int, tokens: int, seconds: float) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.pairs, self.tokens, self.seconds = self.pairs + pairs, self.tokens + tokens, self.seconds + seconds

    def close(self, accelerator) -> dict[str, float]:
        """The window's means over all processes' pairs (a collective when there are several), then an empty
        window. Every rank has the same keys: a stand-in micro-batch adds zeros under its keys."""
        sums, pairs, tokens = self._on_all_ranks(accelerator)
        out = {k: v / max(pairs, 1) for k, v in sums.items()}
        out.update(pairs_per_s=pairs / self.seconds if self.seconds else 0.0,
                   tokens_per_s=tokens / self.seconds if self.seconds else 0.0)
        self.sums, self.pairs, self.tokens, self.seconds = {}, 0, 0, 0.0
        return out

    def state(self, accelerator) -> dict:
        """The open window of all ranks (collective), for a checkpoint: a run resumed in the middle of a window
        logs the mean of all its steps, those before the checkpoint included, as the uninterrupted run does."""
        sums, pairs, tokens = self._on_all_ranks(accelerator)
        return {"sums": sums, "pairs": pairs, "tokens": tokens, "seconds": self.seconds}

    def load(self, state: dict | None) -> None:
        """Restore :meth:`state` into one rank's window (rank 0's: the others start empty, the sums add up)."""
        if state:
            self.add(state["sums"], state["pairs"], state["tokens"], state["seconds"])

    def _on_all_ranks(self, accelerator) -> tuple[dict[str, float], int, int]:
        sums, pairs, tokens = self.sums, self.pairs, self.tokens
        if accelerator.num_processes > 1:
            keys = sorted(sums)
            local = torch.tensor([sums[k] for k in keys] + [pairs, tokens], dtype=torch.float64,
                                 device=accelerator.device)
            totals = accelerator.reduce(local, reduction="sum").tolist()
            sums, pairs, tokens = dict(zip(keys, totals[:-2])), int(totals[-2]), int(totals[-1])
        return sums, pairs, tokens


class MetricsLogger:
    def __init__(self, output_dir: Path, report_to: list[str], *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._tb = self._wandb = None
        if not enabled:
            return
        for backend in report_to:
            if backend == "tensorboard":
                try:  # a base dependency, but an environment built by hand may still lack it
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise _not_installed("tensorboard") from None
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            elif backend == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise _not_installed("wandb") from None
                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mpo"), dir=str(output_dir))
            elif backend not in ("none", "jsonl"):
                raise ConfigError(f"train.report_to: unknown backend {backend!r} (tensorboard, wandb)")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()
        shown = " ".join(f"{k.split('/')[-1].replace('_weighted', '')}={_fmt(metrics[k])}"
                         for k in CONSOLE_KEYS if k in metrics)
        log.info("step %d %s", step, shown)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _not_installed(backend: str) -> ConfigError:
    # a ConfigError, not an ImportError traceback: `mpo train` prints it as one line naming the key (exit 2)
    return ConfigError(f"train.report_to: {backend} is not installed (pip install {backend})")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
