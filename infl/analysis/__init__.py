"""Analyses of finished artifacts (read only): the results view and, later, the paper's analyses."""
