"""Encoder-prefill-decode with real processes: Redis, dlslime-ctrl, a `slipstream encoder`, a prefill and a
decode `slipstream serve` and the router, all registered in one control-plane scope. Image requests go
encoder -> prefill (which pulls the embeddings over DLSlime) -> decode and give the offline (hybrid) engine's
answers for 0, 1 and 3 images, streaming and not; a bad image is the encoder's 400; an encoder that dies
leaves a clear error and a cluster that keeps serving, with every pool and embedding region free."""
from __future__ import annotations

import signal
import time

import openai
import pytest

from tests.support.cluster import Cluster
from tests.support.multimodal import (EncoderProcess, chat_content as content, data_url, decoded, make_image,
                                      offline_chat_text)

pytest.importorskip("dlslime", reason="dlslime (and the system library libibverbs1) is needed for EPD transfers")

IMAGES = [make_image(70, 45, 1), make_image(40, 90, 2), make_image(33, 127, 3)]


@pytest.fixture(scope="module")
def epd(tiny_qwen3_vl, shared_ctrl_plane, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("epd")
    c = Cluster(tiny_qwen3_vl, shared_ctrl_plane, log_dir)
    encoder = EncoderProcess(tiny_qwen3_vl, log_dir, "--ctrl-address", shared_ctrl_plane.address, "--ctrl-scope",
                             c.scope, "--ctrl-heartbeat-interval", "0.5", "--lease-timeout", "5")
    try:
        c.engines_of("prefill", "decode")
        encoder.wait_healthy()
        c.start_router().wait_engines(3)
        yield c, encoder
    finally:
        encoder.stop()
        c.stop()


def wait_free(encoder: EncoderProcess, engines, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while encoder.info()["leases"]:
        assert time.monotonic() < deadline, encoder.info()
        time.sleep(0.02)
    for e in engines:
        front = e.wait_kv_free()["front"]
        region = front.get("embedding_region")
        if region is not None:  # a prefill front that pulled embeddings holds none of them afterwards
            assert region["free_blocks"] == region["blocks"] and not region["quarantined_blocks"], region


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_epd_equals_hybrid(num_images, epd, tiny_qwen3_vl, llm_cache):
    c, encoder = epd
    urls = [data_url(img, fmt) for img, fmt in zip(IMAGES, ["PNG", "JPEG", "WEBP"])][:num_images]
    expected = offline_chat_text(llm_cache.get(tiny_qwen3_vl), decoded(urls), 10)[0]
    before = encoder.info()
    client = openai.OpenAI(base_url=c.router.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model=str(tiny_qwen3_vl), messages=[{"role": "user", "content": content(urls)}], max_tokens=10,
                  temperature=0, extra_body={"ignore_eos": True})
    assert client.chat.completions.create(**kwargs).choices[0].message.content == expected
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    after = encoder.info()
    # image requests went through the encoder (the second one hit its cache); text ones did not
    assert after["requests"] - before["requests"] == (2 if num_images else 0)
    assert after["encoded_images"] - before["encoded_images"] <= num_images
    wait_free(encoder, c.engines)


def test_bad_image_is_the_encoders_400(epd, tiny_qwen3_vl):
    c, encoder = epd
    status, body, _ = c.engines[0].request("GET", "/health")
    import json
    import urllib.request
    req = urllib.request.Request(c.router.url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": str(tiny_qwen3_vl), "max_tokens": 2, "messages": [
                                     {"role": "user", "content": content(["data:image/png;base64,AAAA"])}]}).encode())
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("a bad image was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
        err = json.loads(e.read())["error"]
        assert err["param"].startswith("messages[0].content[1]"), err
    wait_free(encoder, c.engines)


def test_hybrid_engine_takes_encoded_images(epd, tiny_qwen3_vl, tmp_path, llm_cache):
    """Encoder + hybrid (what the router does without prefill/decode engines): the hybrid front pulls the
    encoder's embeddings and answers as if it had encoded the images itself."""
    from tests.support.server import start_server
    _, encoder = epd
    urls = [data_url(IMAGES[1]), data_url(IMAGES[2])]
    hybrid = start_server(tiny_qwen3_vl, tmp_path)
    try:
        status, encoded = encoder.http.post_json("/v1/encode", {"images": [{"url": u} for u in urls]})
        assert status == 200 and len(encoded["images"]) == 2
        body = {"model": str(tiny_qwen3_vl), "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": content(urls)}]}
        status, local = hybrid.post_json("/v1/chat/completions", body)
        assert status == 200, local
        status, remote = hybrid.post_json("/v1/chat/completions",
                                          {**body, "kv_transfer_params": {"encoded_images": encoded}})
        assert status == 200, remote
        assert remote["choices"][0]["message"]["content"] == local["choices"][0]["message"]["content"]
        assert remote["usage"]["prompt_tokens"] == local["usage"]["prompt_tokens"]
        status, _ = encoder.http.post_json("/v1/encode/free", {"lease_ids": [encoded["lease_id"]]})
        assert status == 200
        wait_free(encoder, [hybrid])
    finally:
        hybrid.stop()


def test_prefill_takes_embeddings_only_from_registered_encoders(epd, tiny_qwen3_vl):
    """A forged descriptor (an unknown encoder, or a known one at another address) is a 400 before any pull."""
    c, encoder = epd
    prefill = next(e for e in c.engines if e.role == "prefill")
    urls = [data_url(IMAGES[0])]
    status, encoded = encoder.http.post_json("/v1/encode", {"images": [{"url": u} for u in urls]})
    assert status == 200
    stranger = {**encoded, "encoder_id": "f" * 32}
    elsewhere = {**encoded, "source": {**encoded["source"], "port": encoded["source"]["port"] + 1}}
    for forged, why in ((stranger, "not registered"), (elsewhere, "not the ones")):
        status, err = prefill.post_json("/v1/chat/completions", {
            "model": str(tiny_qwen3_vl), "max_tokens": 2, "messages": [{"role": "user", "content": content(urls)}],
            "kv_transfer_params": {"do_remote_decode": True, "encoded_images": forged}})
        assert status == 400 and why in err["error"]["message"], err
    encoder.http.post_json("/v1/encode/free", {"lease_ids": [encoded["lease_id"]]})
    wait_free(encoder, c.engines)


def test_a_dead_encoder_is_a_clear_error_and_text_keeps_flowing(epd, tiny_qwen3_vl):
    """(Last in this module: it kills the module's encoder.) Killed after it encoded (the prefill front's pull fails: 502), then for good (no encoder: 503); text
    requests are served throughout, and every pool is free afterwards."""
    c, encoder = epd
    prefill = next(e for e in c.engines if e.role == "prefill")
    status, encoded = encoder.http.post_json("/v1/encode", {"messages": [
        {"role": "user", "content": content([data_url(IMAGES[0])])}]})
    assert status == 200
    encoder.stop(signal.SIGKILL)
    status, body, _ = prefill.request("POST", "/v1/chat/completions", {
        "model": str(tiny_qwen3_vl), "max_tokens": 2, "messages": [{"role": "user", "content": content(
            [data_url(IMAGES[0])])}], "kv_transfer_params": {"encoded_images": encoded}}, timeout=60)
    assert status == 502 and b"encoder" in body, body  # the pull from the dead encoder failed
    client = openai.OpenAI(base_url=c.router.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=str(tiny_qwen3_vl), max_tokens=2, messages=[
            {"role": "user", "content": content([data_url(IMAGES[1])])}])
    assert err.value.status_code in (502, 503) and "encode" in str(err.value)
    text = client.chat.completions.create(model=str(tiny_qwen3_vl), max_tokens=3, messages=[
        {"role": "user", "content": "hello"}])
    assert text.choices[0].finish_reason in ("length", "stop")
    for e in c.engines:
        region = e.wait_kv_free()["front"].get("embedding_region")
        if region is not None:  # the failed pull's blocks came back (or were set aside: a write might land)
            assert region["free_blocks"] + region["quarantined_blocks"] == region["blocks"], region


def test_up_runs_encoder_prefill_decode(tiny_qwen3_vl, tmp_path, llm_cache):
    """configs/local-epd.yaml as shipped (the tiny model, free ports): `slipstream up` starts the control plane, the
    encoder, prefill, decode and the router; an image request is answered as the offline engine answers it, and
    `slipstream status` lists the encoder."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.support.ctrl_plane import _binary
    from tests.support.server import REPO, free_port, start_up, stop_up
    _binary("redis-server"), _binary("dlslime-ctrl")
    config = yaml.safe_load((REPO / "configs" / "local-epd.yaml").read_text())
    ports = [free_port() for _ in range(4)]
    config["model"] = str(tiny_qwen3_vl)
    config["gateway"]["port"] = ports[0]
    for role, port in zip(("encode", "prefill", "decode"), ports[1:]):
        config["roles"][role]["port"] = port
        if role != "encode":
            config["roles"][role]["args"] = {"num_kv_blocks": 512}
    config["control_plane"]["scope"] = f"up-epd-{os.getpid()}"
    path = tmp_path / "local-epd.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, lines = start_up(path)
    try:
        client = openai.OpenAI(base_url=lines[-1].rsplit(" ", 1)[1].strip(), api_key="none", max_retries=0)
        urls = [data_url(IMAGES[0])]
        answer = client.chat.completions.create(model=str(tiny_qwen3_vl), max_tokens=10, temperature=0,
                                                extra_body={"ignore_eos": True},
                                                messages=[{"role": "user", "content": content(urls)}])
        assert answer.choices[0].message.content == offline_chat_text(llm_cache.get(tiny_qwen3_vl), decoded(urls), 10)[0]
        ctrl = next(line for line in lines if "control plane:" in line).split()[3]
        status = subprocess.run([sys.executable, "-m", "engine.cli.main", "status", "--ctrl-address", ctrl,
                                 "--ctrl-scope", config["control_plane"]["scope"]], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert "3 engine(s)" in status.stdout and "\nencode " in status.stdout, status.stdout
        assert " leases " in status.stdout, status.stdout
    finally:
        rest = stop_up(proc)
    assert proc.returncode == 0, rest[-3000:]
