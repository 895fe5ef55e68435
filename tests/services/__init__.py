"""Real services for tests: each started on a free loopback port in a temp dir, stopped cleanly."""
