"""The KV cache: its spec per attention kind and the block-major pool."""
