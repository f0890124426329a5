"""Inference engines contributed through ``inferno_engines()``."""
