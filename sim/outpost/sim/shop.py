"""The shop's own systems, for ``outpost demo`` (and anyone trying connectors): the store's API
(:mod:`outpost.sim.store_api`, OAuth2 on) and its mail server (:mod:`outpost.sim.mailbox`), and the
connector declarations that point the retail agents' capabilities at them.

    with ShopPeers() as shop:
        settings["connectors"]["declared"] = shop.connectors()
        secrets.set(shop.SECRET, shop.api.client_secret)     # the declarations name it

Plain data only: the simulator imports no service (the CLI checks the declarations when the
gateway starts).
"""

from __future__ import annotations

import secrets
from typing import Any

from outpost.sim.mailbox import Mailbox
from outpost.sim.store_api import StoreAPI

SENDER = "outpost@shop.example"
STAFF = "staff@shop.example"


class ShopPeers:
    SECRET = "store-api"
    """The secret the store connector's OAuth2 client secret is stored under."""

    def __init__(self) -> None:
        self.api = StoreAPI(auth=True, client_secret=secrets.token_urlsafe(24))
        self.mail = Mailbox()

    def start(self) -> ShopPeers:
        self.api.start()
        self.mail.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.mail.stop()

    def __enter__(self) -> ShopPeers:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def connectors(self) -> dict[str, Any]:
        """``connectors.declared`` for the retail agents' capabilities (docs/connectors.md)."""
        url = self.api.url
        return {
            "store": {
                "kind": "http",
                "endpoint": {
                    "base_url": url,
                    "auth": {
                        "kind": "oauth2",
                        "token_url": f"{url}/oauth/token",
                        "client_id": self.api.client_id,
                        "client_secret": {"secret": self.SECRET},
                    },
                },
                "capabilities": {
                    "inventory.reorder": {
                        "op": {"method": "POST", "path": "/reorders"},
                        "input": {
                            "type": "object",
                            "required": ["shelf", "quantity"],
                            "properties": {
                                "shelf": {"type": "string"},
                                "quantity": {"type": "integer", "minimum": 1},
                            },
                        },
                        "order_by": "shelf",
                        "cost": 0.05,
                    },
                    "maintenance.ticket": {
                        "op": {"method": "POST", "path": "/tickets"},
                        "input": {"type": "object", "required": ["device", "what"]},
                        "cost": 0.5,
                    },
                },
                "timeout_s": 5,
                "rate": {"per_s": 20, "burst": 40},
                "concurrency": 4,
            },
            "mail": {
                "kind": "smtp",
                "endpoint": {"host": "127.0.0.1", "port": self.mail.port},
                "capabilities": {
                    "notify.staff": {
                        "op": {
                            "from": SENDER,
                            "to": STAFF,
                            "subject": "[{urgency}] {device}",
                            "body": "{what}",
                        },
                        "input": {"type": "object", "required": ["device", "what", "urgency"]},
                        "cost": 0.01,
                    },
                    "notify.customer": {
                        "op": {
                            "from": SENDER,
                            "to": "receipts+{till}@shop.example",
                            "subject": "Thank you for shopping with us",
                            "body": "Your basket of {amount_eur} EUR at {till}: thank you! ({template})",
                        },
                        "input": {"type": "object", "required": ["items"]},
                        "batch": {"max": 10, "wait_s": 2},
                        "cost": 0.02,
                    },
                },
                "timeout_s": 10,
                "rate": {"per_s": 10, "burst": 20},
            },
        }

    def summary(self) -> dict[str, Any]:
        """What took effect on the peers: calls by path (and how many were replays of a key), mails."""
        by_path: dict[str, dict[str, int]] = {}
        for effect in self.api.effects().values():
            row = by_path.setdefault(str(effect.get("path")), {"effects": 0, "requests": 0})
            row["effects"] += int(effect.get("effects", 0))
            row["requests"] += int(effect.get("requests", 0))
        ids = self.mail.by_message_id()
        return {
            "store_api": by_path,
            "mails": sum(ids.values()),
            "mails_duplicated": sum(n - 1 for n in ids.values() if n > 1),
        }
