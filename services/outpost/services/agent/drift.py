"""Input drift: are the scores an agent decides on still like those it was set up with?

A two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the last ``window`` scores
against a baseline (the first ``baseline`` scores the agent saw, kept across restarts). Inputs
drift when the KS distance passes ``max_distance`` and the test is significant (``min_p``): then the
agent's decisions go to a person until they come back (docs/agents.md, "Drift"). The test runs every
``window // 4`` scores, not on each: it costs ~0.1 ms.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from outpost.services.agent.spec import Drift


@dataclass(slots=True)
class DriftWatch:
    spec: Drift
    baseline: list[float] = field(default_factory=list)
    recent: deque[float] = field(default_factory=deque)
    distance: float = 0.0
    p: float = 1.0
    drifted: bool = False
    _since: int = 0

    def add(self, score: float) -> bool:
        """Take one score; True when the drift verdict changed."""
        if not self.spec.enabled:
            return False
        if len(self.baseline) < self.spec.baseline:
            self.baseline.append(score)
            return False
        self.recent.append(score)
        if len(self.recent) > self.spec.window:
            self.recent.popleft()
        self._since += 1
        if len(self.recent) < self.spec.window or self._since < max(1, self.spec.window // 4):
            return False
        self._since = 0
        from scipy.stats import ks_2samp  # at the first test: 1 s and 70 MB an agent without drift never pays

        result = ks_2samp(self.baseline, list(self.recent))
        self.distance, self.p = float(result.statistic), float(result.pvalue)
        was = self.drifted
        self.drifted = self.distance > self.spec.max_distance and self.p < self.spec.min_p
        return was != self.drifted

    def dump(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "recent": list(self.recent),
            "distance": self.distance,
            "p": self.p,
            "drifted": self.drifted,
        }

    def load(self, doc: dict[str, Any]) -> None:
        self.baseline = [float(x) for x in doc.get("baseline", ())][: self.spec.baseline]
        self.recent = deque((float(x) for x in doc.get("recent", ())), maxlen=None)
        self.distance = float(doc.get("distance", 0.0))
        self.p = float(doc.get("p", 1.0))
        self.drifted = bool(doc.get("drifted", False))

    def view(self) -> dict[str, Any]:
        return {
            "drifted": self.drifted,
            "distance": round(self.distance, 3),
            "p": round(self.p, 4),
            "baseline": f"{len(self.baseline)}/{self.spec.baseline}",
        }
