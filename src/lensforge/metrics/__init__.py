"""Metrics: classification numbers (scikit-learn is the reference) and their plots."""
