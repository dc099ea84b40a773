"""The telemetry service: every service's metrics rolled up per minute (counts, rates, merged
quantile sketches) and written to InfluxDB 2 (or VictoriaMetrics) within an uplink byte budget,
through a disk spool that outlives the store and the service (docs/telemetry.md)."""
