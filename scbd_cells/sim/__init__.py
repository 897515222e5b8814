"""Simulator stage: realistic screens with known biology and batch effects (``simulate``)."""
