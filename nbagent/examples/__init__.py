"""Runnable examples; ``python -m nbagent demo`` runs :mod:`nbagent.examples.quickstart`."""
