"""Core: what every stage uses (options, errors, safe outputs, progress, torchrun)."""
