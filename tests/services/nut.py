"""pytest fixtures: nut (filled in by its owner)."""
