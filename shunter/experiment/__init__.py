"""Reproducible experiments over the simulator (`shunter experiment NAME`)."""
