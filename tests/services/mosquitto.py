"""pytest fixtures: mosquitto (filled in by its owner)."""
