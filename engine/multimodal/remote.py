"""Image embeddings an encoder server computed (EPD mode): the descriptor its /v1/encode answers with and the
router passes to prefill in `kv_transfer_params.encoded_images`, and the prefill front's pull of those
embeddings from the encoder's region into its own (engine/multimodal/region.py) over a KV transfer agent:
the same transports, validation, timeouts and failure states as a KV migration. A pull that fails is a 502
naming the encoder; the front's blocks are freed (kept out of use if a write might still land)."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import torch

from engine.errors import BadGatewayError, InvalidRequestError
from engine.multimodal.inputs import ImageInput
from engine.multimodal.region import EmbeddingRegion, blocks_for

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
    """The front's region and agent, made on the first EPD request. Rows must be the model's width
    (hidden x (1 + deepstack taps)); the dtype is the encoder's (the first one seen sizes the region)."""

    DTYPES = ("float32", "bfloat16", "float16")

    def __init__(self, host: str, num_blocks: int, timeout_s: float, row_width: int, merge_size: int):
        self.host, self.num_blocks, self.timeout_s = host, num_blocks, timeout_s
        self.row_width, self.merge_size = row_width, merge_size
        self.region: EmbeddingRegion | None = None
        self.agent = None
        self.quarantined: list[int] = []

    def _check(self, enc: EncodedImages) -> torch.dtype:
        bad = lambda why: InvalidRequestError(f"invalid kv_transfer_params.encoded_images: {why}",
                                              param="kv_transfer_params")
        if enc.dtype not in self.DTYPES:
            raise bad(f"dtype {enc.dtype!r} is not one of {', '.join(self.DTYPES)}")
        if enc.row_width != self.row_width:
            raise bad(f"rows of {enc.row_width} values; this model's are {self.row_width}")
        m = self.merge_size
        for img in enc.images:
            t, h, w = img.grid_thw
            if min(t, h, w) <= 0 or h % m or w % m or img.num_tokens != t * h * w // (m * m):
                raise bad(f"an image's {img.num_tokens} tokens do not fit its grid {list(img.grid_thw)}")
            if len(img.block_ids) != blocks_for(img.num_tokens):
                raise bad("an image's blocks do not hold its tokens")
        if sum(len(img.block_ids) for img in enc.images) > self.num_blocks:
            raise bad(f"the images' {sum(i.num_tokens for i in enc.images)} tokens exceed this server's embedding "
                      "region (--embedding-region-tokens)")
        return getattr(torch, enc.dtype)

    async def pull(self, enc: EncodedImages) -> list[tuple[EncodedImage, bytes]]:
        """Each image's embedding rows, as bytes of `enc.dtype` [num_tokens, row_width]."""
        from engine.pd.pull import TERMINAL, TransferState
        from engine.pd.transfer import KVTransferAgent, TransferError
        dtype = self._check(enc)
        if self.region is None:
            self.region = EmbeddingRegion(self.num_blocks, self.row_width, dtype)
            self.agent = KVTransferAgent(self.region.tensor, host=self.host, transport="tcp")
        if dtype != self.region.dtype:
            raise InvalidRequestError(f"encoded_images of {enc.dtype}; this server pulls "
                                      f"{str(self.region.dtype).removeprefix('torch.')}", param="kv_transfer_params")
        remote = [b for img in enc.images for b in img.block_ids]
        local = self.region.alloc(len(remote))
        if local is None:
            raise BadGatewayError("the embedding region is busy with other pulls; retry")  # 502: another engine may
        try:
            pull = self.agent.start_pull(enc.source, remote, local, self.timeout_s)
        except TransferError as e:
            self.region.free(local)
            raise InvalidRequestError(f"encoded_images cannot be pulled: {e}", param="kv_transfer_params") from None
        try:
            while pull.poll() not in TERMINAL:
                await asyncio.sleep(PULL_POLL_S)
        except BaseException:  # the request was cancelled mid-pull: a read may still land in these blocks
            pull.abort("the request was cancelled")
            (self.region.free if pull.safe_to_free else self.quarantined.extend)(local)
            raise
        if pull.state is not TransferState.DONE:
            (self.region.free if pull.safe_to_free else self.quarantined.extend)(local)
            raise BadGatewayError(f"pulling image embeddings from encoder {enc.encoder_id[:12]} failed: "
                                  f"{pull.state.value}: {pull.error}")
        out, i = [], 0
        for img in enc.images:
            blocks = local[i:i + len(img.block_ids)]
            i += len(img.block_ids)
            out.append((img, self.region.read(blocks, img.num_tokens).view(torch.uint8).numpy().tobytes()))
        self.region.free(local)
        return out

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()


def image_inputs(pulled: list[tuple[EncodedImage, bytes]], dtype: str) -> list[ImageInput]:
    """The pulled images as ImageInputs carrying their embeddings (no pixels), for expand_placeholders."""
    # keyed by what was pulled, not by what the descriptor claims: a forged hash cannot reach another image's
    # prefix-cache blocks or encoder-cache entry
    return [ImageInput(content_hash="epd:" + hashlib.sha256(emb).hexdigest(), offset=0, num_tokens=img.num_tokens,
                       grid_thw=img.grid_thw, height=img.height, width=img.width, pixels=b"", embedding=emb,
                       embedding_dtype=dtype)
            for img, emb in pulled]
