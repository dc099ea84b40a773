"""A shop's mail server for the demo and the tests: SMTP on loopback (aiosmtpd), keeping what it
receives in memory so a test or the demo's summary can read it back: the smtp connector's peer.

    with Mailbox() as mb:          # a free port on 127.0.0.1
        ...                        # connectors' smtp endpoint: {host: 127.0.0.1, port: mb.port}
        mb.messages                # what arrived, in order

``python -m outpost.sim.mailbox --port P`` runs one until interrupted, printing each message's
recipients and subject.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller

from outpost.broker import free_port


@dataclass(frozen=True, slots=True)
class Mail:
    sender: str
    recipients: tuple[str, ...]
    subject: str
    message_id: str
    body: str
    at: float


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's hook name)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(("plain",)) if msg.is_multipart() else msg
        text = body.get_content() if body is not None else ""
        mail = Mail(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            str(msg.get("Subject", "")),
            str(msg.get("Message-ID", "")),
            str(text),
            time.time(),
        )
        with self.box.lock:
            self.box.messages.append(mail)
        return "250 OK"


class Mailbox:
    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.messages: list[Mail] = []
        self.lock = threading.Lock()
        self._controller: Controller | None = None

    def start(self) -> Mailbox:
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Mailbox:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def by_message_id(self) -> dict[str, int]:
        """How many copies of each Message-ID arrived (a duplicate shows as 2)."""
        counts: dict[str, int] = {}
        with self.lock:
            for m in self.messages:
                counts[m.message_id] = counts.get(m.message_id, 0) + 1
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="A loopback SMTP server that prints what it receives.")
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args()
    box = Mailbox(args.port).start()
    print(f"mailbox on 127.0.0.1:{box.port}", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.5)
            with box.lock:
                new = box.messages[seen:]
            seen += len(new)
            for m in new:
                print(f"{', '.join(m.recipients)}: {m.subject}", flush=True)
    except KeyboardInterrupt:
        box.stop()


if __name__ == "__main__":
    main()
