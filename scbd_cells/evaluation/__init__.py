"""Evaluation stage: complexes files, CORUM precision-recall, batch prediction, report."""
