"""Turns an OpenAI `image_url` into a decoded RGB image, within limits: `data:` URLs always; `http(s)` URLs only
from the domains the operator allows (none by default: a server must not be made to fetch arbitrary URLs), with
a size cap and a timeout. Every failure is a 400 that names the content part."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.errors import InvalidRequestError

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()  # hosts (and their subdomains) http(s) images may come from
    max_image_bytes: int = 20 << 20  # encoded size
    max_image_pixels: int = 64 << 20  # decoded width x height (a decompression bomb stops here)
    fetch_timeout_s: float = 10.0

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in self.allowed_domains))


def decode_image(data: bytes, policy: MediaPolicy, param: str):
    """PNG/JPEG/WebP bytes -> a fully decoded RGB PIL image."""
    from PIL import Image, UnidentifiedImageError
    if len(data) > policy.max_image_bytes:
        raise InvalidRequestError(f"the image is {len(data)} bytes; the limit is {policy.max_image_bytes}", param=param)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise InvalidRequestError(f"image format {img.format} is not supported (use PNG, JPEG or WebP)",
                                          param=param)
            if img.width * img.height > policy.max_image_pixels:
                raise InvalidRequestError(f"the image is {img.width}x{img.height} pixels; the limit is "
                                          f"{policy.max_image_pixels} pixels", param=param)
            img.load()  # decode now: a truncated file fails here, not in the engine
            return img.convert("RGB")
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"the image could not be decoded: {e}", param=param) from None


def parse_data_url(url: str, param: str) -> bytes:
    head, sep, body = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise InvalidRequestError("a data URL looks like data:image/png;base64,...", param=param)
    media = head[5:].split(";")
    if media[0] and not media[0].startswith("image/"):
        raise InvalidRequestError(f"a data URL of type {media[0]} is not an image", param=param)
    if "base64" not in media[1:]:
        raise InvalidRequestError("image data URLs must be base64-encoded", param=param)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the data URL is not valid base64", param=param) from None


async def fetch_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    import aiohttp
    host = urlsplit(url).hostname or ""
    if not policy.allows(host):
        raise InvalidRequestError(f"images from {host or url!r} are not allowed (the server's "
                                  "--allowed-media-domains names the hosts it fetches from)", param=param)
    timeout = aiohttp.ClientTimeout(total=policy.fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise InvalidRequestError(f"fetching the image answered HTTP {resp.status}", param=param)
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):  # read() returns what is buffered
                    data += chunk
                    if len(data) > policy.max_image_bytes:
                        break
    except InvalidRequestError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise InvalidRequestError(f"fetching the image took over {policy.fetch_timeout_s:g} s", param=param) from None
    except aiohttp.ClientError as e:
        raise InvalidRequestError(f"the image could not be fetched: {e}", param=param) from None
    return bytes(data)


async def load_image(url: str, policy: MediaPolicy, param: str):
    """An image_url's image, decoded (RGB PIL image)."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("image_url.url must be a non-empty string", param=param)
    scheme = url.split(":", 1)[0].lower()
    # decoding runs on a thread: a large PNG would stall the event loop (and /health) otherwise
    if scheme == "data":
        return await asyncio.to_thread(decode_image, parse_data_url(url, param), policy, param)
    if scheme in ("http", "https"):
        return await asyncio.to_thread(decode_image, await fetch_bytes(url, policy, param), policy, param)
    raise InvalidRequestError(f"image URLs must be data: or http(s): URLs, not {scheme}:", param=param)
