"""Discrete-event simulator: the real scheduling code driven by a virtual clock."""
