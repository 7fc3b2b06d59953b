"""Triton kernels and their pure-torch references (kernels/reference.py). No model or Ray knowledge."""
