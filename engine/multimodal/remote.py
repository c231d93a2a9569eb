"""Image embeddings an encoder server computed (EPD mode): the descriptor its /v1/encode answers with and the
router passes to prefill in `kv_transfer_params.encoded_images`, and the prefill front's pull of those
embeddings from the encoder's region into its own (engine/multimodal/region.py) over a KV transfer agent:
the same transports, validation, timeouts and failure states as a KV migration. A pull that fails is a 502
naming the encoder; the front's blocks are freed (kept out of use if a write might still land)."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import torch

from engine.errors import BadGatewayError, InvalidRequestError
from engine.multimodal.inputs import ImageInput
from engine.multimodal.region import EmbeddingRegion

PULL_POLL_S = 0.0005


class EncodedImage(msgspec.Struct, kw_only=True):
    content_hash: str
    num_tokens: int
    grid_thw: tuple[int, int, int]
    height: int
    width: int
    block_ids: list[int]


class EncodedImages(msgspec.Struct, kw_only=True):
    encoder_id: str
    lease_id: str
    source: dict[str, Any]  # the encoder's KVTransferAgent.endpoint_info()
    dtype: str
    row_width: int  # hidden * (1 + deepstack taps)
    images: list[EncodedImage]


def parse(value) -> EncodedImages:
    try:
        return msgspec.convert(value, EncodedImages)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(f"invalid kv_transfer_params.encoded_images: {e}", param="kv_transfer_params") from None


class EmbeddingPuller:
    """The front's region and agent, made on the first EPD request (sized by the first descriptor's row width)."""

    def __init__(self, host: str, num_blocks: int, timeout_s: float):
        self.host, self.num_blocks, self.timeout_s = host, num_blocks, timeout_s
        self.region: EmbeddingRegion | None = None
        self.agent = None
        self.quarantined: list[int] = []

    def _open(self, width: int, dtype: torch.dtype) -> None:
        from engine.pd.transfer import KVTransferAgent
        self.region = EmbeddingRegion(self.num_blocks, width, dtype)
        self.agent = KVTransferAgent(self.region.tensor, host=self.host, transport="tcp")

    async def pull(self, enc: EncodedImages) -> list[tuple[EncodedImage, bytes]]:
        """Each image's embedding rows, as bytes of `enc.dtype` [num_tokens, row_width]."""
        dtype = getattr(torch, enc.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidRequestError(f"encoded_images has an unknown dtype {enc.dtype!r}", param="kv_transfer_params")
        if self.region is None:
            self._open(enc.row_width, dtype)
        if (enc.row_width, dtype) != (self.region.width, self.region.dtype):
            raise InvalidRequestError("encoded_images rows do not match this server's embedding region",
                                      param="kv_transfer_params")
        remote = [b for img in enc.images for b in _image_blocks(img)]
        local = self.region.alloc(len(remote))
        if local is None:
            raise BadGatewayError("the embedding region is full; retry")  # 502: another prefill engine may take it
        placed = _local_blocks(enc.images, local)
        from engine.pd.transfer import TransferError
        from engine.pd.pull import TERMINAL, TransferState
        try:
            pull = self.agent.start_pull(enc.source, remote, local, self.timeout_s)
        except TransferError as e:
            self.region.free(local)
            raise InvalidRequestError(f"encoded_images cannot be pulled: {e}", param="kv_transfer_params") from None
        while pull.poll() not in TERMINAL:
            await asyncio.sleep(PULL_POLL_S)
        if pull.state is not TransferState.DONE:
            (self.region.free if pull.safe_to_free else self.quarantined.extend)(local)
            raise BadGatewayError(f"pulling image embeddings from encoder {enc.encoder_id[:12]} failed: "
                                  f"{pull.state.value}: {pull.error}")
        out = []
        for img, blocks in zip(enc.images, placed):
            out.append((img, self.region.read(blocks, img.num_tokens).view(torch.uint8).numpy().tobytes()))
        self.region.free(local)
        return out

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()


def _image_blocks(img: EncodedImage) -> list[int]:
    from engine.multimodal.region import blocks_for
    if len(img.block_ids) != blocks_for(img.num_tokens) or img.num_tokens <= 0:
        raise InvalidRequestError("encoded_images: an image's blocks do not hold its tokens", param="kv_transfer_params")
    return img.block_ids


def _local_blocks(images: list[EncodedImage], local: list[int]) -> list[list[int]]:
    from engine.multimodal.region import blocks_for
    out, i = [], 0
    for img in images:
        n = blocks_for(img.num_tokens)
        out.append(local[i:i + n])
        i += n
    return out


def image_inputs(pulled: list[tuple[EncodedImage, bytes]], dtype: str) -> list[ImageInput]:
    """The pulled images as ImageInputs carrying their embeddings (no pixels), for expand_placeholders."""
    return [ImageInput(content_hash=img.content_hash, offset=0, num_tokens=img.num_tokens, grid_thw=img.grid_thw,
                       height=img.height, width=img.width, pixels=b"", embedding=emb, embedding_dtype=dtype)
            for img, emb in pulled]
