"""hubwatch collector: MQTT -> InfluxDB ingest, outages, alerts and reports (central side)."""

from agent import __version__

__all__ = ["__version__"]
