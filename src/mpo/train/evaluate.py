"""``mpo eval``: how often a model prefers the chosen answer on held-out pairs.

Two accuracies per dataset and overall:

* ``logp_accuracy``: share of pairs where log π(chosen) > log π(rejected) (sums over answer tokens) — what the
  model would pick; needs no reference;
* ``reward_accuracy``: share where the implicit reward β·(log π − log π_ref) of chosen beats rejected — what DPO
  optimises; needs the reference (by default the base model recorded in the run's ``config.yaml``).

Ties count as not preferred. Each row of each dataset is used once (``repeat_time`` is ignored; 0 still skips).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mpo.data.encode import PairEncoder
from mpo.data.errors import RowError
from mpo.data.images import DEFAULT_MAX_PIXELS
from mpo.data.meta import read_meta
from mpo.data.mixture import PreferenceMixture
from mpo.data.system import resolve_system_prompt
from mpo.models import load_model, load_processor
from mpo.train.attention import has_sliding_window
from mpo.train.data import Collator, EncodedPairs
from mpo.train.forward import PairScorer, backbone_of
from mpo.train.shared import SUPPORTED_ATTENTION

__all__ = ["EvalReport", "run_eval", "resolve_run_model", "score_pairs"]


@dataclass
class DatasetStats:
    pairs: int = 0
    skipped: int = 0  # rows that could not be scored (reasons in EvalReport.skipped_rows)
    logp_wins: int = 0
    reward_wins: int = 0
    margin_sum: float = 0.0
    logp_margin_sum: float = 0.0

    def to_dict(self, has_ref: bool) -> dict:
        """Means over the scored pairs; None (shown "-") when none was scored, not an accuracy of 0."""
        n = self.pairs

        def mean(total: float) -> float | None:
            return total / n if n else None

        out = {"pairs": n, "skipped": self.skipped, "logp_accuracy": mean(self.logp_wins),
               "mean_logp_margin": mean(self.logp_margin_sum)}
        if has_ref:
            out.update({"reward_accuracy": mean(self.reward_wins), "mean_reward_margin": mean(self.margin_sum)})
        return out


@dataclass
class EvalReport:
    model: str
    reference: str | None
    datasets: dict[str, dict] = field(default_factory=dict)
    overall: dict = field(default_factory=dict)
    skipped_rows: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        cols = ["pairs", "skipped", "logp_accuracy", "reward_accuracy", "mean_logp_margin", "mean_reward_margin"]
        rows = [("dataset", *cols)]
        for name, stats in [*self.datasets.items(), ("overall", self.overall)]:
            rows.append((name, *(_cell(stats.get(c)) for c in cols)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if self.skipped_rows:  # accuracies are over the scored pairs only: say what was left out, and why
            lines.append(f"{len(self.skipped_rows)} rows skipped, e.g.:")
            lines += [f"  {reason}" for reason in self.skipped_rows[:3]]
        return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def _run_of(path: str | Path) -> tuple[Path, dict] | None:
    """(model folder, the run's config) when ``path`` is an mpo training output: a run folder (its ``final``), its
    ``final``, or one of its ``checkpoint-N/model`` (with the checkpoint's config); None for any other folder, also
    one that merely sits next to some ``config.yaml``."""
    path = Path(path)
    candidates = [(path / "config.yaml", path / "final")]
    if path.name == "final" or (path.name == "model" and re.fullmatch(r"checkpoint-\d+", path.parent.name)):
        candidates.append((path.parent / "config.yaml", path))
    for cfg_file, model_dir in candidates:
        if cfg_file.is_file() and (model_dir / "config.json").is_file():
            cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
                return model_dir, cfg
    return None


def resolve_run_model(path: str | Path) -> tuple[str, str | None]:
    """A model folder, or a training output → (model path, reference path recorded in the run)."""
    return _model_and_base(path, _run_of(path))


def _model_and_base(path: str | Path, run: tuple[Path, dict] | None) -> tuple[str, str | None]:
    return (str(path), None) if run is None else (str(run[0]), run[1]["model"].get("path"))


@torch.no_grad()
def score_pairs(scorer: PairScorer, dataset: EncodedPairs, *, batch_size: int, pad_id: int):
    """Yield (sources, chosen_logps (B,), rejected_logps (B,), errors) over the dataset in order."""
    attn = getattr(scorer.model.config, "_attn_implementation", None) or "sdpa"
    # shared: exact and ~2x less prompt compute; the plain layout for what it cannot run
    shared = attn in SUPPORTED_ATTENTION and not has_sliding_window(backbone_of(scorer.model))
    layout = "shared" if shared else "naive"
    collate = Collator(pad_id, layout, attn_implementation=attn, dtype=next(scorer.parameters()).dtype)
    scorer.eval()
    for start in range(0, len(dataset), batch_size):
        batch, errors = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if batch is None:
            yield [], None, None, errors
            continue
        scores = scorer(batch)
        yield batch.sources, scores.chosen_logps, scores.rejected_logps, errors


def _setting(run: tuple[Path, dict] | None, section: str, key: str, missing=None):
    """``section.key`` of a run's config (:func:`_run_of`); ``missing`` for a run whose config has no such key
    (written before it existed); None when there is no run."""
    return None if run is None else (run[1].get(section) or {}).get(key, missing)


def run_eval(model_path: str, meta_path: str, *, reference: str | None = None, beta: float | None = None,
             max_length: int | None = None, max_dynamic_patch: int | None = None, batch_size: int = 8,
             blank_images: bool = False, trust_remote_code: bool = False, seed: int = 42,
             system_prompt: str | None = None) -> EvalReport:
    """Held-out accuracy of ``model_path``. Settings left None are the run's own when ``model_path`` is a training
    output (β, tile budget, max_length and system prompt it trained with: the pairs are encoded as in training),
    else 0.1, 16384 tokens, 12 tiles and ``auto``."""
    run = _run_of(model_path)  # read once: every setting left None comes from it
    if beta is None:  # the run's own β, so that the reward margins are the ones it trained with
        beta = _setting(run, "loss", "beta") or 0.1
    if max_length is None:
        max_length = _setting(run, "data", "max_length") or 16384
    if max_dynamic_patch is None:
        max_dynamic_patch = _setting(run, "data", "max_dynamic_patch") or 12
    pixels = _setting(run, "data", "max_image_pixels", missing=DEFAULT_MAX_PIXELS)
    if not (math.isfinite(beta) and beta > 0):  # a negative β flips every reward margin
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if system_prompt is None:  # the run's own prompts
        system_prompt = _setting(run, "data", "system_prompt", missing="none") or "auto"
    model_path, recorded = _model_and_base(model_path, run)
    reference = reference if reference is not None else recorded
    processor = load_processor(model_path, trust_remote_code=trust_remote_code)
    specs = [dataclasses.replace(s, repeat_time=1.0) if s.repeat_time > 0 else s for s in read_meta(meta_path)]
    mixture = PreferenceMixture(specs, seed=seed, max_dynamic_patch=max_dynamic_patch,
                                max_image_pixels=DEFAULT_MAX_PIXELS if pixels is None else pixels)
    encoder = PairEncoder(processor, max_length=max_length,
                          system_prompt=resolve_system_prompt(processor, system_prompt))
    dataset = EncodedPairs(mixture, encoder, blank_images=blank_images)
    tok = getattr(processor, "tokenizer", processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    policy = PairScorer(load_model(model_path, trust_remote_code=trust_remote_code))
    ref_scores = None
    if reference:
        ref = PairScorer(load_model(reference, trust_remote_code=trust_remote_code))
        ref_scores = list(score_pairs(ref, dataset, batch_size=batch_size, pad_id=pad_id))
        del ref
    stats: dict[str, DatasetStats] = defaultdict(DatasetStats)
    report = EvalReport(model=model_path, reference=reference)
    for k, (sources, chosen, rejected, errors) in enumerate(score_pairs(policy, dataset, batch_size=batch_size,
                                                                         pad_id=pad_id)):
        for err in errors:
            if isinstance(err, RowError):
                report.skipped_rows.append(str(err))
                stats[err.dataset].skipped += 1
        if chosen is None:
            continue
        for j, (name, _line) in enumerate(sources):
            s = stats[name]
            s.pairs += 1
            s.logp_wins += int(chosen[j] > rejected[j])
            s.logp_margin_sum += float(chosen[j] - rejected[j])
            if ref_scores is not None:
                _, rc, rr, _ = ref_scores[k]
                margin = beta * float((chosen[j] - rc[j]) - (rejected[j] - rr[j]))
                s.reward_wins += int(margin > 0)
                s.margin_sum += margin
    total = DatasetStats()
    for name in mixture.dataset_sizes:
        if name in stats:
            report.datasets[name] = stats[name].to_dict(ref_scores is not None)
            for f in dataclasses.fields(DatasetStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(stats[name], f.name))
    report.overall = total.to_dict(ref_scores is not None)
    return report
