"""Generalization probes: measurements of a trained (or training) network that do not change it."""
