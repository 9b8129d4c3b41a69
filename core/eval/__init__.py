"""Verification: persona fidelity, routing accuracy, scene round trips, mood layers, scale
calibration, activation pictures, and the report that gathers them."""
