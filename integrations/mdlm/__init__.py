"""mdlm integration (in progress)."""
