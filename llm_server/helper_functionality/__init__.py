"""Helper functionality: YAML configuration loading and model initialisation (the spec's helpers)."""
