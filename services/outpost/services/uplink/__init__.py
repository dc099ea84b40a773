"""The uplink: everything the cloud must get (alerts, decisions, action audit records, rollups,
chosen events) kept on the site's disk until the cloud side has committed it, sent by priority
within a bandwidth cap and a disk budget; and its cloud side (docs/uplink.md)."""
