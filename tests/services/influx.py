"""pytest fixtures: influx (filled in by its owner)."""
