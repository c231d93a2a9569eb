"""Model families (one file each), their registry, the normalised ModelConfig and weight loading."""
