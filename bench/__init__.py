"""Measurements of pool (``make bench``); never run as tests."""
