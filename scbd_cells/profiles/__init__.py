"""Profiles stage: cell, guide and gene profiles in and out.

Aggregation and replicates, the AnnData and profile-table files, the CellProfiler-style
baseline, batch corrections (``correct``) and the tables other tools read (``export``).
"""
