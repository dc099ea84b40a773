"""Agents: decision loops that sense, reason, act and learn, under supervision, with people in the
loop and a durable log (docs/agents.md)."""
