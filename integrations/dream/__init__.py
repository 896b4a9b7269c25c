"""dream integration (in progress)."""
