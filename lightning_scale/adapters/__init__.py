"""Adapters that let the suite's strategies drive models this project did not write."""
