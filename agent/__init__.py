"""hubwatch agent: measures a hub machine's power, bandwidth and uptime."""

__version__ = "0.1.0"
