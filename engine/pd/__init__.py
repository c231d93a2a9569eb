"""Prefill/decode disaggregation: KV-block migration between engines."""
