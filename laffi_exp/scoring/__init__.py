"""Scoring: the official SQuAD 2.0 metrics, per-question scores and the statistics of the reports."""
