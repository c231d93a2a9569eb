"""Images through the real server: OpenAI chat content parts with `image_url` (data: URLs; http(s) from allowed
hosts only), driven by the official `openai` client, give the offline engine's tokens for 0, 1 and 3 images,
streaming and not; bad images and over-limit requests are 400s naming the part, and the server keeps serving."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import openai
import pytest

from tests.support.multimodal import chat_content as content, data_url, decoded, make_image, offline_chat_text
from tests.support.server import start_server

MAX_IMAGES = 3


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server with one PNG (the 'remote' image) at /cat.png."""
    import numpy as np
    from PIL import Image
    files = {}
    for name, img in (("/cat.png", make_image(50, 40, 9)),  # small, and ~145 kB of noise (many reads)
                      ("/big.png", Image.fromarray(np.random.default_rng(0).integers(0, 256, (220, 220, 3), np.uint8)))):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[name] = buf.getvalue()
    assert 100_000 < len(files["/big.png"]) < 200_000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for i in range(0, len(body or b""), 4096):  # in pieces, as a real server's body arrives
                self.wfile.write(body[i:i + 4096])
                self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def vl_server(tiny_qwen3_vl, tmp_path_factory):
    server = start_server(tiny_qwen3_vl, tmp_path_factory.mktemp("server-vl"), "--max-images-per-prompt",
                          str(MAX_IMAGES), "--max-image-bytes", "200000", "--allowed-media-domains", "127.0.0.1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vl_server):
    return openai.OpenAI(base_url=vl_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_chat_with_images_matches_offline(num_images, client, tiny_qwen3_vl, llm_cache):
    images = [make_image(70, 45, 1), make_image(40, 90, 2), make_image(33, 127, 3)][:num_images]
    urls = [data_url(img, fmt) for img, fmt in zip(images, ["PNG", "JPEG", "WEBP"])]
    text, prompt_len = offline_chat_text(llm_cache.get(tiny_qwen3_vl), decoded(urls), 10)
    kwargs = dict(model=str(tiny_qwen3_vl), messages=[{"role": "user", "content": content(urls)}], max_tokens=10,
                  temperature=0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kwargs)
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens == prompt_len  # each image counts as its placeholder tokens
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_remote_image_from_allowed_host(client, tiny_qwen3_vl, image_host):
    out = client.chat.completions.create(model=str(tiny_qwen3_vl), max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": content([image_host + "/cat.png", image_host + "/big.png"])}])
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens > 36  # the big one is there, whole (a truncated PNG would be a 400)


def bad_cases(image_host: str):
    png = data_url(make_image(30, 30, 1))
    raw = base64.b64decode(png.split(",", 1)[1])
    gif = io.BytesIO()
    make_image(30, 30, 1).save(gif, format="GIF")
    big = io.BytesIO()
    make_image(400, 400, 1).save(big, format="PNG", compress_level=0)
    b64 = lambda data, kind="png": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
    return {
        "truncated": [b64(raw[:len(raw) // 2])],
        "gif": [b64(gif.getvalue(), "gif")],
        "too-large": [b64(big.getvalue())],
        "too-many": [png] * (MAX_IMAGES + 1),
        "not-base64": ["data:image/png;base64,@@@"],
        "not-an-image": ["data:text/plain;base64,aGVsbG8="],
        "host-not-allowed": ["http://localhost:1/cat.png"],
        "not-found": [image_host + "/nothing.png"],
        "file-url": ["file:///etc/passwd"],
    }


@pytest.mark.parametrize("case", ["truncated", "gif", "too-large", "too-many", "not-base64", "not-an-image",
                                  "host-not-allowed", "not-found", "file-url"])
def test_bad_images_are_400s_and_the_server_keeps_serving(case, vl_server, tiny_qwen3_vl, image_host):
    urls = bad_cases(image_host)[case]
    status, body, _ = vl_server.request("POST", "/v1/chat/completions", {
        "model": str(tiny_qwen3_vl), "max_tokens": 2, "messages": [{"role": "user", "content": content(urls)}]})
    assert status == 400, body
    import json
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith("messages"), err
    status, body, _ = vl_server.request("POST", "/v1/chat/completions", {
        "model": str(tiny_qwen3_vl), "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body


def test_text_model_server_refuses_image_parts(tiny_server, tiny_llama):
    status, body, _ = tiny_server.request("POST", "/v1/chat/completions", {
        "model": str(tiny_llama), "max_tokens": 2, "messages": [{"role": "user", "content": content(
            [data_url(make_image(20, 20, 0))])}]})
    assert status == 400 and b"does not take images" in body
