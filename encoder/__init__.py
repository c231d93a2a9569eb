"""The encoder role (`slipstream encoder MODEL`): a vision-encoder server. It loads only the vision tower,
batches images from concurrent requests, keeps their embeddings in a registered host region keyed by image
content, and answers /v1/encode with a descriptor that prefill engines pull the embeddings by (EPD mode).
It uses the engine's public pieces (image loading and preprocessing, the vision tower, the transfer agent,
registration); the engine never imports this package."""
