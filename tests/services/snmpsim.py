"""pytest fixtures: snmpsim (filled in by its owner)."""
