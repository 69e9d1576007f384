"""A fake sampler for the unit tests of the generation loop (never used by the product).

Its text is a pure function of the sample seed, so tests can predict every record; it records each call so that
tests can check what was (and was not) asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mpo.generate.samplers import Sample, SampleRequest, SamplingParams


@dataclass
class FakeSampler:
    """``text(seed)`` defaults to ``"s<seed mod 10^6>"``; ``calls`` holds ``(len(requests), n)`` per call."""

    text: object = None
    calls: list[tuple[int, int]] = field(default_factory=list)
    requests: list[SampleRequest] = field(default_factory=list)

    def sample(self, requests: Sequence[SampleRequest], n: int, params: SamplingParams) -> list[list[Sample]]:
        self.calls.append((len(requests), n))
        self.requests.extend(requests)
        make = self.text or (lambda req, seed: f"s{seed % 1_000_000}")
        return [[Sample(make(req, s), "stop", 3) for s in req.seeds] for req in requests]


def write_jsonl(path, rows) -> None:
    """Rows as JSON lines; a ``str`` row is written verbatim (to make bad lines)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
