"""What an image is once the front has processed it, and where it sits in the prompt.

An image becomes `num_tokens` placeholder tokens in the prompt (its grid of patches after the spatial merge).
The engine core never sees pixels in any other form: `ImageInput.pixels` is the resized RGB image (uint8,
row-major [H, W, 3]); normalisation and patchifying happen on the device (engine/multimodal/patches.py), so a
request carries 3 bytes per pixel rather than 8 floats per pixel."""
from __future__ import annotations

import hashlib

import msgspec
import numpy as np


class ImageInput(msgspec.Struct, kw_only=True, array_like=True):
    content_hash: str  # sha256 of the resized pixels and their grid: equal images share embeddings and KV
    offset: int  # index of its first placeholder token in the prompt
    num_tokens: int  # placeholder tokens (= its embedding rows)
    grid_thw: tuple[int, int, int]  # patches along time, height, width (before the spatial merge)
    height: int
    width: int
    pixels: bytes  # uint8 RGB [height, width, 3] (empty when the embeddings came from an encoder server)
    # EPD: the embedding rows an encoder computed, [num_tokens, hidden * (1 + deepstack taps)] of this dtype
    embedding: bytes = b""
    embedding_dtype: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


def content_hash(pixels: np.ndarray, grid_thw: tuple[int, int, int]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    h.update(repr((pixels.shape, tuple(grid_thw))).encode())
    return h.hexdigest()


def expand_placeholders(token_ids: list[int], image_token_id: int, images: list[ImageInput]
                        ) -> tuple[list[int], list[ImageInput]]:
    """The prompt with each single image placeholder token (as the chat template writes it) repeated to its
    image's token count, and the images (in prompt order) placed at their offsets. The placeholder count
    must equal the image count."""
    from engine.errors import InvalidRequestError
    slots = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(slots) != len(images):
        raise InvalidRequestError(f"the prompt has {len(slots)} image placeholders for {len(images)} images",
                                  param="messages")
    out: list[int] = []
    placed: list[ImageInput] = []
    prev = 0
    for slot, img in zip(slots, images):
        out.extend(token_ids[prev:slot])
        placed.append(msgspec.structs.replace(img, offset=len(out)))
        out.extend([image_token_id] * img.num_tokens)
        prev = slot + 1
    out.extend(token_ids[prev:])
    return out, placed


def mrope_positions(num_tokens: int, images: list[ImageInput], spatial_merge_size: int) -> tuple[np.ndarray, int]:
    """Multimodal rope positions [3, num_tokens] (time, height, width) of a prompt, as Qwen-VL's get_rope_index
    lays them out: text tokens count on from the last position on all three axes; an image's tokens take its
    (t, h, w) grid offset by the position it starts at, and the text after it starts past its largest extent.
    Also the delta that positions after the prompt add to their index (one axis suffices there)."""
    pos = np.empty((3, num_tokens), np.int64)
    cur, at = 0, 0
    for img in images:
        n_text = img.offset - at
        pos[:, at:img.offset] = np.arange(cur, cur + n_text)
        cur += n_text
        t, h, w = img.grid_thw[0], img.grid_thw[1] // spatial_merge_size, img.grid_thw[2] // spatial_merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pos[:, img.offset:img.end] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur += max(h, w)
        at = img.end
    pos[:, at:] = np.arange(cur, cur + num_tokens - at)
    delta = int(pos.max()) + 1 - num_tokens if num_tokens else 0
    return pos, delta


class StepImage(msgspec.Struct, kw_only=True, array_like=True):
    """The part of an image a step feeds: `length` placeholder tokens from fed-token row `row` on, which take
    the image's embedding rows from `start` on (a prefill chunk may cover part of an image)."""

    row: int
    start: int
    length: int
    image: ImageInput


def step_images(images: list[ImageInput], first: int, num_new: int, row: int) -> list[StepImage]:
    """The images (parts) that prompt tokens [first, first + num_new), fed from step row `row` on, cover."""
    out = []
    for img in images:
        lo, hi = max(first, img.offset), min(first + num_new, img.end)
        if lo < hi:
            out.append(StepImage(row=row + lo - first, start=lo - img.offset, length=hi - lo, image=img))
    return out
