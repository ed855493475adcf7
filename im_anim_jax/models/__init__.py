"""Flax Linen models. Every parameter carries logical axis names (see configs, `mesh.rules`)."""
