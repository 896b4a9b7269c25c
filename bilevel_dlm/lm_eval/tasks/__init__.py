"""The offline long-context tasks for lm-eval (YAMLs and their loader)."""
