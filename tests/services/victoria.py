"""pytest fixtures: victoria (filled in by its owner)."""
