"""Speculative decoding: drafts proposed for each decoding sequence, verified by one forward of the target
model over the last token and the drafts (engine/spec_decode/verify.py)."""
