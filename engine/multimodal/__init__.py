"""Multimodal inputs: images fetched and decoded (`image_loader`), resized to the vision tower's grid
(`processor`), and carried to the engine core as `ImageInput`s (`inputs`) that the model runner encodes
(or, in EPD mode, an encoder server has encoded)."""
