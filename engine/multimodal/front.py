"""The API front's multimodal half: for a model with a vision tower, the image parts of chat messages are
loaded (engine/multimodal/image_loader.py), resized on a worker thread, and placed on the rendered prompt's
placeholder tokens. Limits (images per request, bytes, pixels, remote domains) are the operator's."""
from __future__ import annotations

import asyncio
from pathlib import Path

from engine.errors import InvalidRequestError
from engine.multimodal.image_loader import MediaPolicy, load_image
from engine.multimodal.inputs import ImageInput, expand_placeholders
from engine.multimodal.processor import ImageProcessorConfig
from engine.multimodal.remote import EmbeddingPuller, image_inputs, parse


def check_image_count(num_images: int, limit: int) -> None:
    if num_images > limit:
        raise InvalidRequestError(f"{num_images} images in one request; the limit is {limit}", param="messages")


async def load_images(urls: list[tuple[str, str]], processor: ImageProcessorConfig, policy: MediaPolicy
                      ) -> list[ImageInput]:
    """Each (url, field path) fetched or decoded, then resized (on a thread: the event loop keeps serving); an
    error names the part it came from."""
    images = await asyncio.gather(*(load_image(url, policy, param) for url, param in urls))
    processed = []
    for img, (_, param) in zip(images, urls):
        try:
            processed.append(await asyncio.to_thread(processor.process, img))
        except InvalidRequestError as e:
            raise InvalidRequestError(e.message, param=param) from None
    return processed


class ImageFront:
    def __init__(self, processor: ImageProcessorConfig, image_token_id: int, policy: MediaPolicy, max_images: int,
                 puller: EmbeddingPuller | None = None):
        self.processor = processor
        self.image_token_id = image_token_id
        self.policy = policy
        self.max_images = max_images
        self.puller = puller  # EPD: pulls what an encoder server computed (engine/multimodal/remote.py)

    @classmethod
    def for_model(cls, path: str, policy: MediaPolicy, max_images: int,
                  pull: dict | None = None) -> "ImageFront | None":
        """None for a text-only model (or one whose checkpoint folder this front cannot read)."""
        from engine.models.config import load_model_config
        folder = Path(path)
        if not (folder / "config.json").is_file():
            return None
        cfg = load_model_config(folder)
        if cfg.vision is None or cfg.image_token_id is None:
            return None
        puller = None
        if pull is not None:  # EPD: rows are the model's embedding followed by its deepstack features
            width = cfg.hidden_size * (1 + len(getattr(cfg.vision, "deepstack_visual_indexes", ())))
            puller = EmbeddingPuller(row_width=width, merge_size=cfg.vision.spatial_merge_size, **pull)
        return cls(ImageProcessorConfig.from_model(cfg.vision, folder), cfg.image_token_id, policy, max_images, puller)

    def check_count(self, num_images: int) -> None:
        check_image_count(num_images, self.max_images)

    async def place(self, token_ids: list[int], urls: list[tuple[str, str]]) -> tuple[list[int], list[ImageInput]]:
        """The prompt's placeholders expanded and its images placed; `urls`: (url, the part's field path)."""
        self.check_count(len(urls))
        return expand_placeholders(token_ids, self.image_token_id, await load_images(urls, self.processor, self.policy))

    async def place_encoded(self, token_ids: list[int], urls: list[tuple[str, str]], encoded
                            ) -> tuple[list[int], list[ImageInput]]:
        """EPD: the prompt's images as an encoder server encoded them (`kv_transfer_params.encoded_images`), their
        embeddings pulled from its region; the request's image parts are not fetched again."""
        enc = parse(encoded)
        if len(enc.images) != len(urls):
            raise InvalidRequestError(f"encoded_images holds {len(enc.images)} images for the request's "
                                      f"{len(urls)} image parts", param="kv_transfer_params")
        if self.puller is None:
            raise InvalidRequestError("this server does not take encoded_images", param="kv_transfer_params")
        pulled = await self.puller.pull(enc)
        return expand_placeholders(token_ids, self.image_token_id, image_inputs(pulled, enc.dtype))

    def close(self) -> None:
        if self.puller is not None:
            self.puller.close()
