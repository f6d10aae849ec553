"""Feedback sources: the annotator interface, the simulated pools, human files, LLM annotators and the feedback
report."""
