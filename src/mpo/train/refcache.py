"""Reference log-probs computed once (``mpo precompute-ref``) and read back during training.

The reference model is frozen and deterministic (eval mode, no dropout, no augmentation), so its log-probs of
every pair can be computed once, before training: training then keeps no reference model in memory and runs no
reference forward. TRL refuses this for vision datasets and LLaMA-Factory closed it as wontfix.

Layout of a cache folder::

    fingerprint.json        what the numbers depend on (see :func:`fingerprint`)
    parts/rank<R>.jsonl     {"d": dataset, "l": line, "c": chosen_logp, "r": rejected_logp}, appended per batch
    logps.npz               merged arrays per dataset (written atomically when every pair is done)
    rejected_rows.jsonl     rows that could not be used (they are skipped in training too)

Resumable: a killed precompute restarts from its part files (a torn last line is discarded) and computes only the
missing pairs. Keys are (dataset name, line number): repeat_time copies share one entry.

A cache is used only if its fingerprint matches the run: the model weights (file names, sizes and a SHA-256 of
the first and last 8 MiB of every weight file — a full hash of hundreds of GB would cost more than the precompute),
the annotation files (size and mtime), the tile budgets, the chat template and tokenizer, ``max_length`` and the
dtype. A mismatch is refused with the list of what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mpo import __version__
from mpo.data.encode import ENCODING_VERSION
from mpo.fsio import atomic_write_bytes, atomic_write_json

__all__ = ["RefCacheError", "fingerprint", "CachedReference", "PartWriter", "read_parts", "merge_parts"]

log = logging.getLogger("mpo.refcache")
_EDGE = 8 << 20


class RefCacheError(RuntimeError):
    """The cache is missing, incomplete, or was built for another model, data or setting."""


def _weights_digest(model_path: str) -> dict:
    path = Path(model_path)
    if not path.is_dir():  # a hub id: its revision is the best identity we have
        return {"hub_id": model_path}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    out = {}
    for p in files:
        h = hashlib.sha256()
        size = p.stat().st_size
        with open(p, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
        out[p.name] = {"size": size, "sha256_edges": h.hexdigest()}
    return out


def fingerprint(cfg, specs, processor, system_prompt: str | None) -> dict:
    """Everything the reference log-probs depend on, as plain JSON (``system_prompt``: the resolved system message
    of rows without one, :func:`mpo.data.system.resolve_system_prompt`)."""
    tok = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None) or ""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    return {
        "model": cfg.model.path,
        "weights": _weights_digest(cfg.model.path),
        "dtype": cfg.model.dtype,
        "max_length": cfg.data.max_length,
        "max_dynamic_patch": cfg.data.max_dynamic_patch,
        "max_image_pixels": cfg.data.max_image_pixels,  # which rows are usable
        "encoding_version": ENCODING_VERSION,  # how mpo renders a pair into tokens
        "datasets": {s.name: {"annotation": str(s.annotation), "size": s.annotation.stat().st_size,
                              "mtime_ns": s.annotation.stat().st_mtime_ns, "max_dynamic_patch": s.max_dynamic_patch,
                              "root": str(s.root), "data_augment": s.data_augment}
                     for s in specs if s.repeat_time > 0},
        # data_augment draws each row's JPEG qualities from (data.seed, dataset, line)
        "augment_seed": cfg.data.seed if any(s.data_augment for s in specs if s.repeat_time > 0) else None,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "system_prompt": system_prompt,
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "mpo_version": __version__,
    }


def _diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {b!r}, this run has {a!r}")
    return out


class PartWriter:
    """Appends whole result lines to ``parts/rank<R>.jsonl`` and flushes per batch."""

    def __init__(self, cache_dir: Path, rank: int):
        self.path = cache_dir / "parts" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, sources: list[tuple[str, int]], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        lines = [json.dumps({"d": d, "l": line, "c": c, "r": r})
                 for (d, line), c, r in zip(sources, chosen.tolist(), rejected.tolist())]
        self._fh.write("".join(x + "\n" for x in lines))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_parts(cache_dir: Path) -> Iterator[tuple[str, int, float, float]]:
    """Every complete line of every part file; a torn last line (a kill mid-write) is cut off the file."""
    for part in sorted((cache_dir / "parts").glob("rank*.jsonl")):
        data = part.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: discarding a torn last line (%d bytes)", part, len(data) - end)
            with open(part, "r+b") as fh:
                fh.truncate(end)
        for number, raw in enumerate(data[:end].splitlines(), 1):
            try:
                row = json.loads(raw)
                yield row["d"], int(row["l"]), float(row["c"]), float(row["r"])
            except (ValueError, KeyError, TypeError) as exc:  # a damaged file: name it, do not guess its scores
                raise RefCacheError(f"{part}:{number}: not a cache line ({type(exc).__name__}: {exc}); delete the "
                                    "file to recompute its pairs") from None


def merge_parts(cache_dir: Path, fp: dict) -> int:
    """Merge the part files into ``logps.npz`` (atomically) and write the fingerprint last; returns pairs."""
    per: dict[str, dict[int, tuple[float, float]]] = {}
    for d, line, c, r in read_parts(cache_dir):
        per.setdefault(d, {})[line] = (c, r)
    arrays = {}
    for d, rows in per.items():
        lines = np.array(sorted(rows), dtype=np.int64)
        arrays[f"{d}/lines"] = lines
        arrays[f"{d}/logps"] = np.array([rows[x] for x in lines.tolist()], dtype=np.float64)
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(cache_dir / "logps.npz", buf.getvalue())
    atomic_write_json(cache_dir / "fingerprint.json", fp)
    return sum(len(v) for v in per.values())


class CachedReference:
    """Lookup of (chosen, rejected) reference log-probs by (dataset, line)."""

    def __init__(self, cache_dir: str | Path, expected_fp: dict):
        cache_dir = Path(cache_dir)
        fp_path, npz = cache_dir / "fingerprint.json", cache_dir / "logps.npz"
        if not fp_path.is_file() or not npz.is_file():
            raise RefCacheError(f"{cache_dir}: no complete reference cache (run: mpo precompute-ref CONFIG, or resume it)")
        found = json.loads(fp_path.read_text(encoding="utf-8"))
        diff = _diff(expected_fp, found)
        if diff:
            raise RefCacheError(f"{cache_dir} was built for another setting; refusing it because:\n  "
                                + "\n  ".join(diff[:10]) + "\nrebuild it with: mpo precompute-ref CONFIG")
        self._table: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with np.load(npz) as z:
            names = {k.rsplit("/", 1)[0] for k in z.files}
            for d in names:
                self._table[d] = (z[f"{d}/lines"], z[f"{d}/logps"])
        self.cache_dir = cache_dir

    def lookup(self, sources: list[tuple[str, int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and (B,) rejected reference log-probs for ``sources`` = [(dataset, line), ...]."""
        out = np.empty((len(sources), 2), dtype=np.float64)
        for k, (d, line) in enumerate(sources):
            lines, logps = self._table.get(d, (np.empty(0, np.int64), None))
            j = int(np.searchsorted(lines, line))
            if j >= len(lines) or lines[j] != line:
                raise RefCacheError(f"{self.cache_dir}: no reference log-probs for {d}:{line}; the cache does not "
                                    "cover this data (rebuild it with: mpo precompute-ref CONFIG)")
            out[k] = logps[j]
        t = torch.from_numpy(out).float().to(device)
        return t[:, 0], t[:, 1]

