"""The connector gateway: agents' action requests turned into side effects on real peers, once,
rate-limited, with credentials and an audit trail (docs/connectors.md)."""
