"""llada_moe integration (in progress)."""
