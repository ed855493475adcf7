"""Evaluation of each stage on held-out identities (evaluate.py calls these)."""
