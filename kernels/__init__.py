"""Slipstream kernels: one import point per operation, choosing the fastest installed implementation
and falling back to a plain-torch reference that always works (CPU included)."""
