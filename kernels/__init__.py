"""Compute kernels and their pure-torch references (the references are the CPU path)."""
