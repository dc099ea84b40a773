"""The downlink: commands and desired state from the cloud, applied on the site after any outage.

They come down the edge broker's bridge on ``{root}/down/...`` (QoS 1; the bridge's persistent
session on the cloud broker keeps them while the link is down, :func:`outpost.broker.uplink_bridge`).
A :class:`Downlink` mounts in any service's kit (the uplink service's) and needs that service's
session to be durable, so what arrives while the service restarts waits on the edge broker.

**Desired state** (``down/desired/{service}``, retained on the cloud broker): a JSON object with an
integer version ``ts`` (epoch ns, as ``outpost agents`` writes it). It is republished, retained, on
the site's ``control/{service}/desired`` (the agent service's switch reads ``control/agents/desired``)
unless an older version than the one applied (kept in SQLite) comes: an equal one is republished
again, which is harmless and covers a crash between the publish and its confirmation.

**Commands** (``down/cmd/{target}``, :class:`outpost.contracts.Command`): each id is decided once,
durably (SQLite, in ``folder``): past its ``expires_ns`` it is refused, reported ``expired`` and
dead-lettered ``expired``, never applied late; a second copy is reported ``duplicate``; otherwise it
becomes a local input with an id derived from the command's, so the consumer recognises a copy:

* ``escalation-reply``: an :class:`~outpost.contracts.EscalationReply` on
  ``escalations/{to}/{decision}/reply`` (the agent service answers an escalation with it);
* ``action``: an :class:`~outpost.contracts.ActionRequest` on ``actions/{to}`` (the connectors
  carry it out once per idempotency ``key``; its ``deadline_ns`` defaults to the command's expiry).

A command whose body does not make that input is reported ``rejected`` and dead-lettered
``bad_command``, as is one for an unknown target; one that is not a command at all is dead-lettered
by the kit. Every outcome goes up on ``up/cmd/results`` (:class:`~outpost.contracts.CommandResult`).
The message from the broker is acknowledged once the decision is committed and what it published is
confirmed; if the service dies in between, the broker's redelivery (flagged ``dup``) of a command
already applied publishes its local input again, with the same id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from outpost.contracts import (
    COMMAND,
    DESIRED,
    ActionRequest,
    Command,
    EscalationReply,
    derived_id,
    header,
    validation_summary,
)
from outpost.errors import TopicError
from outpost.log import get_logger
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime
from outpost.store import Store, transaction
from outpost.topics import Topics

log = get_logger("outpost.downlink")

REASONS = ("bad_command", "expired", "bad_desired")
"""The dead-letter reasons a service that mounts a :class:`Downlink` declares."""

TARGETS = ("escalation-reply", "action")
"""What a command can become on the site (``down/cmd/{target}``)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    decided_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS desired (
    service TEXT PRIMARY KEY,
    ts INTEGER NOT NULL
);
"""

Verdict = Literal["apply", "expired", "duplicate"]


# --- the decisions, pure ---------------------------------------------------------------------------
def verdict(expires_ns: int, now_ns: int, seen: bool) -> Verdict:
    """What to do with a command: a copy of one already decided is a duplicate (whatever its
    expiry), one past its expiry is refused, any other is applied."""
    if seen:
        return "duplicate"
    if now_ns > expires_ns:
        return "expired"
    return "apply"


def newer(ts: int, applied: int | None) -> bool:
    """Whether a desired-state version ``ts`` is to be (re)published: not older than the one applied."""
    return applied is None or ts >= applied


def local_input(cmd: Command, target: str, topics: Topics) -> tuple[str, bytes]:
    """(topic, payload) of the local input ``cmd`` becomes; ValueError or ValidationError if its
    body does not make one. Its id is derived from the command's: a copy is recognised downstream."""
    head = header(cmd.trace, id=derived_id("downlink", cmd.id), ts=cmd.ts)
    if target == "escalation-reply":
        if cmd.decision is None:
            raise ValueError("an escalation-reply needs the escalation's decision")
        reply = EscalationReply.model_validate({**cmd.body, **head})
        return topics.escalation_reply(cmd.to, cmd.decision), reply.model_dump_json().encode()
    if target == "action":
        body = {"deadline_ns": cmd.expires_ns, **cmd.body, **head}
        request = ActionRequest.model_validate(body)
        return topics.actions(cmd.to), request.model_dump_json().encode()
    raise ValueError(f"unknown target {target[:64]!r} (one of {', '.join(TARGETS)})")


class Downlink:
    """Commands and desired state from the cloud, on the mounting service's kit (network thread)."""

    def __init__(self, rt: ServiceRuntime, folder: Path, *, clock: Callable[[], int] = time.time_ns) -> None:
        """``folder``: where its SQLite state lives. ``clock``: wall time in epoch ns (the expiry)."""
        self.rt = rt
        self.topics = rt.topics
        self.clock = clock
        self.store = Store(folder / "downlink.db", SCHEMA)
        rt.subscribe(
            self.topics.all_down_desired,
            self._on_desired,
            ack=Ack.AFTER_OUTPUTS,
            topic_key=self.topics.down_desired_service,
            counter="downlink_desired",
        )
        rt.subscribe(
            self.topics.all_down_cmds,
            self._on_command,
            contract=COMMAND,
            ack=Ack.AFTER_OUTPUTS,
            topic_key=self.topics.down_cmd_target,
            invalid_reason="bad_command",
            counter="downlink_commands",
        )

    # --- desired state ---------------------------------------------------------------------------
    def _on_desired(self, inbound: Inbound[bytes]) -> None:
        service = inbound.key
        try:
            doc = orjson.loads(inbound.raw)
        except orjson.JSONDecodeError as exc:
            raise Rejected("bad_desired", f"not JSON: {exc}") from None
        ts = doc.get("ts") if isinstance(doc, dict) else None
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise Rejected("bad_desired", "a desired state is a JSON object with an integer version ts")
        contract = DESIRED.get(service)
        if (
            contract is not None
        ):  # refused here, and said upward, rather than dead-lettered unseen on the site
            try:
                contract.model_validate(doc)
            except ValidationError as exc:
                detail = f"desired state of {service} (ts {ts}) not applied: {validation_summary(exc)}"
                self.rt.dead_letter("bad_desired", detail, inbound.topic, inbound.raw, for_=inbound.turn)
                self._result(inbound, f"desired-{service}-{ts}", "desired", "rejected", detail)
                return
        row = self.store.one("SELECT ts FROM desired WHERE service = ?", (service,))
        if not newer(ts, None if row is None else int(row[0])):
            self.rt.metrics.counters["downlink_desired_older"] += 1
            return
        self.rt.publish(self.topics.control(service, "desired"), inbound.raw, retain=True, for_=inbound.turn)
        with transaction(self.store.db) as db:
            db.execute(
                "INSERT INTO desired (service, ts) VALUES (?, ?) "
                "ON CONFLICT(service) DO UPDATE SET ts = max(ts, excluded.ts)",
                (service, ts),
            )
        self.rt.metrics.counters["downlink_desired_applied"] += 1
        log.info("desired state from the cloud applied", extra={"service": service, "ts": ts})

    # --- commands --------------------------------------------------------------------------------
    def _on_command(self, inbound: Inbound[Command]) -> None:
        target, cmd = inbound.key, inbound.items[0][1]
        row = self.store.one("SELECT outcome FROM commands WHERE id = ?", (cmd.id,))
        what = verdict(cmd.expires_ns, self.clock(), row is not None)
        if what == "duplicate":
            if row is not None and row[0] == "applied" and inbound.dup:
                self._apply(inbound, target, cmd)  # the broker's redelivery: we may have died mid-way
            self._report(inbound, target, cmd, "duplicate", f"already {row[0] if row else 'decided'}")
            return
        if what == "expired":
            late_s = (self.clock() - cmd.expires_ns) / 1e9
            detail = f"command {cmd.id} expired {late_s:.1f} s before it arrived: not applied"
            self._decide(cmd, target, "expired")
            self.rt.dead_letter("expired", detail, inbound.topic, inbound.raw, for_=inbound.turn)
            self._report(inbound, target, cmd, "expired", detail)
            return
        try:
            topic, payload = local_input(cmd, target, self.topics)
        except (ValidationError, ValueError, TopicError) as exc:
            why = validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)
            detail = f"command {cmd.id} for {target}: {why[:500]}"
            self._decide(cmd, target, "rejected")
            self.rt.dead_letter("bad_command", detail, inbound.topic, inbound.raw, for_=inbound.turn)
            self._report(inbound, target, cmd, "rejected", detail)
            return
        self._decide(cmd, target, "applied")
        self.rt.publish(topic, payload, for_=inbound.turn)
        self._report(inbound, target, cmd, "applied", topic.removeprefix(self.topics.root + "/"))

    def _apply(self, inbound: Inbound[Command], target: str, cmd: Command) -> None:
        topic, payload = local_input(cmd, target, self.topics)
        self.rt.publish(topic, payload, for_=inbound.turn)

    def _decide(self, cmd: Command, target: str, outcome: str) -> None:
        with transaction(self.store.db) as db:
            db.execute(
                "INSERT OR IGNORE INTO commands (id, target, outcome, decided_ns) VALUES (?, ?, ?, ?)",
                (cmd.id, target, outcome, self.clock()),
            )

    def _report(
        self, inbound: Inbound[Command], target: str, cmd: Command, outcome: str, detail: str
    ) -> None:
        self._result(inbound, cmd.id, target, outcome, detail, trace=cmd.trace)

    def _result(
        self, inbound: Inbound[Any], command: str, target: str, outcome: str, detail: str, *, trace: str = ""
    ) -> None:
        self.rt.metrics.counters[f"downlink_{outcome}"] += 1
        result = header(trace, id=derived_id("downlink-result", command, outcome))
        result.update(command=command, target=target, outcome=outcome, detail=detail[:2000])
        self.rt.publish(self.topics.cmd_results, orjson.dumps(result), for_=inbound.turn)

    def close(self) -> None:
        self.store.close()
