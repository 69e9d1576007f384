"""Where logged metrics go: the console, ``<output_dir>/metrics.jsonl`` (always), and ``report_to`` backends.

Each loss term is logged raw and weighted (``loss/sft`` and ``loss/sft_weighted``): InternVL's users were puzzled
that the total starts near 1.5–2 even for a converged model (OpenGVLab/InternVL#1087) — that is the SFT term, a
token-mean NLL, which the DPO and BCO terms (≈ 0.55 and 0.28 weighted at step 0) do not dominate.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mpo.config import ConfigError

__all__ = ["MetricsLogger", "CONSOLE_KEYS"]

log = logging.getLogger("mpo.train")

CONSOLE_KEYS = ("loss", "loss/sigmoid_weighted", "loss/bco_pair_weighted", "loss/sft_weighted", "rewards/accuracies",
                "rewards/margins", "delta", "grad_norm", "lr", "pairs_per_s")


METRICS_FILE = "metrics.jsonl"


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
