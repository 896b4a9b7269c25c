"""llada integration (in progress)."""
