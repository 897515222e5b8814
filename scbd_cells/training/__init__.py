"""Training stage: the SCBD training loop, its checkpoints and the alpha sweep."""
