"""Calibration and held-out evaluation text, built offline from packages of the registries."""
