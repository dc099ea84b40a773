"""An example service: alerting scores in, decisions out (docs/architecture.md, "Writing a service").

Every alerting score becomes a decision to notify staff. A message that is not a list of scores is
dead-lettered by the kit; an alert too unsure to act on is dead-lettered here, with its reason.
"""

from __future__ import annotations

import threading

from outpost.contracts import SCORE, Reject, Score, encode
from outpost.service import Ack, Inbound, ServiceRuntime, run_until
from outpost.settings import CoreSettings

NAME = "shelf-alerts"


class ShelfAlerts:
    def __init__(self, settings: CoreSettings, *, min_confidence: float = 0.5) -> None:
        self.rt = ServiceRuntime(NAME, settings, reasons=("unsure",))
        self.min_confidence = min_confidence
        topics = self.rt.topics
        self.decisions = topics.decisions(NAME)
        self.rt.subscribe(topics.all_inference, self.on_scores, contract=SCORE, ack=Ack.AFTER_OUTPUTS)

    def on_scores(self, msg: Inbound[Score]) -> None:
        for index, score in msg.items:
            if not score.alert:
                continue
            if score.confidence < self.min_confidence:
                why = f"{score.label} at confidence {score.confidence} < {self.min_confidence}"
                self.rt.reject(msg, Reject("unsure", why, index, score.model_dump()))
                continue
            decision = encode(
                score.trace,
                agent=NAME,
                task=f"restock-{score.device}",
                kind="act",
                capability="notify.staff",
                args={"device": score.device, "label": score.label},
                confidence=score.confidence,
                reason=f"{score.model} {score.version} says {score.label}",
            )
            self.rt.publish(self.decisions, decision, for_=msg.turn)  # acked once confirmed

    def start(self) -> None:
        self.rt.start()

    def stop(self) -> None:
        self.rt.stop()


def run(settings: CoreSettings, stop: threading.Event) -> ShelfAlerts:
    return run_until(ShelfAlerts(settings), stop)
