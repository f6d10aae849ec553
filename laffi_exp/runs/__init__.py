"""Runs and sweeps: run manifests, finished-cell reuse, loggers and the sweep report."""
