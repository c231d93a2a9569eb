"""Qwen3-VL against Hugging Face transformers on a tiny random checkpoint (tests/support/multimodal.py): the
device-side preprocessing equals the reference image processor, the vision tower's embeddings and deepstack
features match, greedy tokens and their logprobs match for prompts with 0, 1 and 2 images (also in small
prefill chunks that split images, with tensor parallelism over two gloo ranks, and disaggregated over
DLSlime); the prefix cache keys blocks by image content, and the encoder cache encodes an image once."""
from __future__ import annotations

import pytest
import torch

from engine.multimodal.inputs import ImageInput, mrope_positions
from engine.multimodal.patches import image_patches
from engine.multimodal.processor import ImageProcessorConfig, place_images
from engine.sampling_params import SamplingParams
from engine.wire import EngineCoreRequest
from tests.support.multimodal import PREPROCESSOR, make_image

LOGPROB_ATOL = 1e-4
EMBED_ATOL = 1e-4
SIZES = [(70, 45), (40, 90), (16, 16), (300, 200), (33, 127)]  # resized up, down, and kept


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"})


@pytest.fixture(scope="module")
def hf_vl(tiny_qwen3_vl):
    import transformers
    return transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl), dtype=torch.float32).eval()


def image_config(llm) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_model(llm.engine.model_config.vision, llm.engine.model_path)


def chat_ids(llm, images: int, text: str = "hello world") -> list[int]:
    content = [{"type": "text", "text": "Look: "}]
    for i in range(images):
        content += [{"type": "image"}, {"type": "text", "text": f" and {i} "}]
    content.append({"type": "text", "text": text})
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)


def prompt(llm, images: list, text: str = "hello world") -> dict:
    return {"prompt_token_ids": chat_ids(llm, len(images), text), "multi_modal_data": {"image": images}}


def greedy(n: int = 10, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def hf_generate(hf, llm, p: dict, n: int):
    """(tokens, logprob of each) of transformers' greedy generation on the same expanded prompt."""
    images = p["multi_modal_data"]["image"]
    ids, _ = place_images(p["prompt_token_ids"], images, image_config(llm), llm.engine.model_config.image_token_id)
    x = torch.tensor([ids])
    kwargs = {}
    if images:
        px = hf_processor()(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                      mm_token_type_ids=(x == llm.engine.model_config.image_token_id).int())
    with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, len(ids):].tolist()
    lps = [s[0].float().log_softmax(-1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, lps


@pytest.mark.parametrize("size", SIZES)
def test_patches_equal_the_reference_processor(size, tiny_qwen3_vl, llm_cache):
    llm = llm_cache.get(tiny_qwen3_vl)
    cfg = image_config(llm)
    img = make_image(*size, seed=sum(size))
    image = cfg.process(img)
    ref = hf_processor()(images=[img], return_tensors="pt")
    grid = image.grid_thw
    assert list(grid) == ref["image_grid_thw"][0].tolist() and image.num_tokens == grid[1] * grid[2] // 4
    ours = image_patches(image, cfg, torch.device("cpu"))
    torch.testing.assert_close(ours, ref["pixel_values"], atol=1e-6, rtol=0)


def test_vision_tower_matches_transformers(tiny_qwen3_vl, llm_cache, hf_vl):
    llm = llm_cache.get(tiny_qwen3_vl)
    cfg = image_config(llm)
    images = [make_image(*s, seed=i) for i, s in enumerate(SIZES[:3])]
    processed = [cfg.process(img) for img in images]
    patches = torch.cat([image_patches(p, cfg, llm.engine.runner.device) for p in processed])
    ref_px = hf_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        embeds, deepstack = llm.engine.runner.model.encode_images(patches, [tuple(p.grid_thw) for p in processed])
        ref = hf_vl.model.get_image_features(ref_px["pixel_values"], ref_px["image_grid_thw"], return_dict=True)
    joined = lambda t: t if torch.is_tensor(t) else torch.cat(t)  # transformers versions split per image or not
    torch.testing.assert_close(embeds.cpu(), joined(ref.pooler_output), atol=EMBED_ATOL, rtol=0)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        torch.testing.assert_close(ours.cpu(), joined(theirs), atol=EMBED_ATOL, rtol=0)


def test_mrope_positions_match_get_rope_index(tiny_qwen3_vl, llm_cache, hf_vl):
    llm = llm_cache.get(tiny_qwen3_vl)
    images = [make_image(70, 45, 1), make_image(300, 200, 2)]
    p = prompt(llm, images)
    ids, placed = place_images(p["prompt_token_ids"], images, image_config(llm), llm.engine.model_config.image_token_id)
    ours, delta = mrope_positions(len(ids), placed, 2)
    x = torch.tensor([ids])
    grids = torch.tensor([list(i.grid_thw) for i in placed])
    ref, ref_delta = hf_vl.model.get_rope_index(x, (x == llm.engine.model_config.image_token_id).int(), grids)
    assert ours.tolist() == ref[:, 0].tolist() and delta == int(ref_delta)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_greedy_matches_transformers(num_images, tiny_qwen3_vl, llm_cache, hf_vl):
    llm = llm_cache.get(tiny_qwen3_vl)
    images = [make_image(70, 45, 1), make_image(40, 90, 2)][:num_images]
    p = prompt(llm, images)
    out = llm.generate([p], greedy(12, logprobs=0))[0].outputs[0]
    tokens, lps = hf_generate(hf_vl, llm, p, 12)
    assert out.token_ids == tokens
    for entry, tok, lp in zip(out.logprobs, tokens, lps):
        assert abs(entry[tok].logprob - lp) < LOGPROB_ATOL


def test_small_chunks_split_images_and_encode_each_once(tiny_qwen3_vl, llm_cache, hf_vl):
    llm = llm_cache.get(tiny_qwen3_vl, max_num_batched_tokens=8, block_size=4, enable_prefix_caching=False)
    images = [make_image(300, 200, 5), make_image(33, 127, 6)]
    p = prompt(llm, images, "what is this")
    cache = llm.engine.runner.encoder_cache
    misses = cache.misses
    got = llm.generate([p], greedy(8))[0].outputs[0].token_ids
    assert got == hf_generate(hf_vl, llm, p, 8)[0]
    assert cache.misses - misses == 2  # 36 + 16 image tokens over 8-token chunks, yet one encoding each


def test_preemption_recomputes_image_prompts(tiny_qwen3_vl, llm_cache, hf_vl):
    """A preempted sequence recomputes its prompt and outputs in one chunk: image tokens take their 3-D positions,
    the outputs after the prompt index + rope delta (then its decode goes on from there)."""
    llm = llm_cache.get(tiny_qwen3_vl, num_kv_blocks=24, block_size=4, max_model_len=64, max_num_batched_tokens=64,
                        enable_prefix_caching=False)
    ps = [prompt(llm, [make_image(70, 45, 20 + i)], "hi") for i in range(3)]
    before = llm.engine.slices[0].num_preemptions
    outs = llm.generate(ps, greedy(12))
    assert llm.engine.slices[0].num_preemptions > before
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_generate(hf_vl, llm, p, 12)[0]


def test_recompute_chunk_past_the_prompt_takes_the_rope_delta(tiny_qwen3_vl, llm_cache):
    """One chunk feeding an image, the rest of the prompt and two output tokens (a preempted sequence's
    recompute): output positions are index + rope delta on all three axes."""
    from engine.core.scheduler import ScheduledSeq
    from engine.core.sequence import Sequence
    from engine.worker.input_batch import StepBatch
    llm = llm_cache.get(tiny_qwen3_vl)
    images = [make_image(70, 45, 1)]
    p = prompt(llm, images)
    ids, placed = place_images(p["prompt_token_ids"], images, image_config(llm), llm.engine.model_config.image_token_id)
    seq = Sequence("s", ids, greedy(), 0, 100)
    seq.images = placed
    seq.mrope_positions, seq.rope_delta = mrope_positions(len(ids), placed, 2)
    assert seq.rope_delta < 0  # the image's 12 tokens take 4 positions
    seq.token_ids += [5, 6]
    step = StepBatch.from_scheduled([ScheduledSeq(seq, len(seq.token_ids), samples=True)])
    L = len(ids)
    assert step.mrope_positions[:, :L].tolist() == seq.mrope_positions.tolist()
    assert step.mrope_positions[:, L:].tolist() == [[L + seq.rope_delta, L + 1 + seq.rope_delta]] * 3


def test_prefix_cache_keys_blocks_by_image(tiny_qwen3_vl, llm_cache):
    llm = llm_cache.get(tiny_qwen3_vl, block_size=4)
    a, b = make_image(70, 45, 11), make_image(70, 45, 12)  # same size: same tokens, different pixels
    pa, pb = prompt(llm, [a], "describe it please"), prompt(llm, [b], "describe it please")
    ids_a = place_images(pa["prompt_token_ids"], [a], image_config(llm), llm.engine.model_config.image_token_id)[0]
    ids_b = place_images(pb["prompt_token_ids"], [b], image_config(llm), llm.engine.model_config.image_token_id)[0]
    assert ids_a == ids_b
    first = llm.generate([pa], greedy(6))[0]
    again = llm.generate([pa], greedy(6))[0]
    other = llm.generate([pb], greedy(6))[0]
    image_start = ids_a.index(llm.engine.model_config.image_token_id)
    assert again.num_cached_tokens >= (len(ids_a) - 1) // 4 * 4 - 4  # everything but the last block
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # the other image shares only the blocks before it: KV after an image depends on the image
    assert other.num_cached_tokens <= image_start // 4 * 4
    fresh = llm_cache.get(tiny_qwen3_vl, block_size=4, enable_prefix_caching=False).generate([pb], greedy(6))[0]
    assert other.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_tensor_parallel_two_ranks(tiny_qwen3_vl, llm_cache):
    images = [make_image(70, 45, 1), make_image(40, 90, 2)]
    one = llm_cache.get(tiny_qwen3_vl)
    two = llm_cache.get(tiny_qwen3_vl, tensor_parallel_size=2, max_num_batched_tokens=16)
    ps = [prompt(one, images), prompt(one, images[:1], "short"), prompt(one, [])]
    assert ([o.outputs[0].token_ids for o in two.generate(ps, greedy(8))]
            == [o.outputs[0].token_ids for o in one.generate(ps, greedy(8))])


def test_text_model_refuses_images(tiny_llama, llm_cache):
    from engine.errors import InvalidRequestError
    llm = llm_cache.get(tiny_llama)
    with pytest.raises(InvalidRequestError, match="does not take images"):
        llm.generate([{"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": [make_image(20, 20, 0)]}}])


def test_an_image_file_path_is_its_image(tiny_qwen3_vl, llm_cache, tmp_path):
    """multi_modal_data may name an image file instead of holding a PIL image: the same tokens; a file that cannot
    be read is a clear error and the engine keeps serving."""
    from engine.errors import InvalidRequestError
    llm = llm_cache.get(tiny_qwen3_vl)
    image = make_image(40, 28, 3)
    image.save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ids = chat_ids(llm, 1)
    by_path, by_image = (llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": img}}], greedy(6))
                         for img in (str(tmp_path / "photo.png"), image))
    assert by_path[0].outputs[0].token_ids == by_image[0].outputs[0].token_ids
    for bad in (tmp_path / "missing.png", tmp_path / "notes.txt"):
        with pytest.raises(InvalidRequestError, match="could not be read") as err:
            llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": bad}}], greedy(6))
        assert err.value.param == "multi_modal_data"
    assert llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}], greedy(6))[0].outputs
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_placeholder_count_must_match_images(tiny_qwen3_vl, llm_cache):
    from engine.errors import InvalidRequestError
    llm = llm_cache.get(tiny_qwen3_vl)
    with pytest.raises(InvalidRequestError, match="2 images"):
        llm.generate([{"prompt_token_ids": chat_ids(llm, 1), "multi_modal_data": {
            "image": [make_image(20, 20, 0), make_image(20, 20, 1)]}}])
    core = llm.engine
    ids = chat_ids(llm, 1)
    bad = ImageInput(content_hash="x", offset=0, num_tokens=4, grid_thw=(1, 4, 4), height=32, width=32,
                     pixels=bytes(32 * 32 * 3))
    with pytest.raises(InvalidRequestError, match="placeholder"):
        core.add_request(EngineCoreRequest(request_id="bad", prompt_token_ids=ids, params=greedy(), images=[bad]))


def test_disaggregated_equals_hybrid(tiny_qwen3_vl, llm_cache):
    """1P1D over DLSlime: the prefill engine encodes the images; the migration carries them (the decode side's
    rope positions follow from them, and a preempted sequence could recompute its prompt)."""
    pytest.importorskip("dlslime", reason="dlslime (and the system library libibverbs1) is needed for KV transfer")
    from tests.test_pd_core import OPTS, decode_stage, run_until
    hybrid = llm_cache.get(tiny_qwen3_vl, **OPTS)
    prefill = llm_cache.get(tiny_qwen3_vl, role="prefill", **OPTS).engine
    decode = llm_cache.get(tiny_qwen3_vl, role="decode", **OPTS).engine
    cases = [[make_image(70, 45, 1)], [make_image(40, 90, 2), make_image(33, 127, 3), make_image(16, 16, 4)], []]
    migrations = []
    for i, images in enumerate(cases):
        p = prompt(hybrid, images)
        ids, placed = place_images(p["prompt_token_ids"], images, image_config(hybrid),
                                   hybrid.engine.model_config.image_token_id)
        expected = hybrid.generate([p], greedy(8))[0].outputs[0].token_ids
        prefill.add_request(EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=ids, params=greedy(8),
                                              images=placed or None, kv_transfer_params={"do_remote_decode": True}))
        out = next(x for x in run_until(prefill, lambda o: any(x.finished for x in o)) if x.finished)
        migrations.append((f"r{i}", out.kv_transfer_params["migration"], out.kv_transfer_params["seq_id"], expected))
    try:
        tokens, finals = decode_stage(decode, [(rid, m) for rid, m, _, _ in migrations])
        for rid, _, _, expected in migrations:
            assert tokens[rid] == expected, (rid, finals[rid].error)
    finally:
        assert prefill.free_parked([s for _, _, s, _ in migrations]) == len(migrations)


def test_readme_example(tiny_qwen3_vl, tmp_path, monkeypatch, capsys):
    """The README's Qwen3-VL block, as written, with the tiny checkpoint for the hub name and a generated photo."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- example: tests/test_qwen3_vl.py[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    make_image(64, 48, 7).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    code = block.replace('LLM("Qwen/Qwen3-VL-2B-Instruct")',
                         f'LLM({str(tiny_qwen3_vl)!r}, device="cpu", kv_cache_memory_bytes=16 << 20)')
    assert code != block
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_decode_preemption_of_a_migrated_image_prompt_is_a_clear_error(tiny_qwen3_vl, llm_cache):
    """The migration carries where the images sit, not their pixels: a decode engine that must preempt such a
    sequence cannot recompute it, so the request ends with an error saying so (and frees its KV); the other
    request finishes with the hybrid tokens."""
    pytest.importorskip("dlslime", reason="dlslime (and the system library libibverbs1) is needed for KV transfer")
    from tests.test_pd_core import OPTS, decode_stage, run_until
    hybrid = llm_cache.get(tiny_qwen3_vl, **OPTS)
    prefill = llm_cache.get(tiny_qwen3_vl, role="prefill", **OPTS).engine
    decode = llm_cache.get(tiny_qwen3_vl, role="decode", **{**OPTS, "num_kv_blocks": 24, "max_model_len": 64}).engine
    migrations = []
    for i in range(2):
        images = [make_image(70, 45, 30 + i)]
        p = prompt(hybrid, images, "hi")
        ids, placed = place_images(p["prompt_token_ids"], images, image_config(hybrid),
                                   hybrid.engine.model_config.image_token_id)
        expected = hybrid.generate([p], greedy(12))[0].outputs[0].token_ids
        prefill.add_request(EngineCoreRequest(request_id=f"q{i}", prompt_token_ids=ids, params=greedy(12),
                                              images=placed, kv_transfer_params={"do_remote_decode": True}))
        out = next(x for x in run_until(prefill, lambda o: any(x.finished for x in o)) if x.finished)
        migrations.append((f"q{i}", out.kv_transfer_params["migration"], out.kv_transfer_params["seq_id"], expected))
    try:
        tokens, finals = decode_stage(decode, [(rid, m) for rid, m, _, _ in migrations])
    finally:
        assert prefill.free_parked([s for _, _, s, _ in migrations]) == 2
    errors = [rid for rid, _, _, _ in migrations if finals[rid].finish_reason == "error"]
    assert len(errors) == 1 and "cannot recompute" in finals[errors[0]].error
    ok = next(m for m in migrations if m[0] not in errors)
    assert tokens[ok[0]] == ok[3]


def test_moe_variant_matches_transformers_and_splits_over_ranks(tiny_qwen3_vl_moe, llm_cache):
    """Qwen3-VL-MoE (experts saved stacked, as transformers 5 writes them): greedy tokens and logprobs as
    transformers gives them, and the same tokens with the experts' width split over two ranks (TP) and with
    the experts themselves split (EP)."""
    import transformers
    hf = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl_moe),
                                                                          dtype=torch.float32).eval()
    llm = llm_cache.get(tiny_qwen3_vl_moe)
    assert llm.engine.runner.model.model.layers[0].mlp.experts.fused_checkpoint
    ps = [prompt(llm, [make_image(70, 45, 1)]), prompt(llm, [make_image(40, 90, 2), make_image(33, 127, 3)]),
          prompt(llm, [])]
    outs = llm.generate(ps, greedy(10, logprobs=0))
    for p, out in zip(ps, outs):
        tokens, lps = hf_generate(hf, llm, p, 10)
        assert out.outputs[0].token_ids == tokens
        for entry, tok, lp in zip(out.outputs[0].logprobs, tokens, lps):
            assert abs(entry[tok].logprob - lp) < LOGPROB_ATOL
    expected = [o.outputs[0].token_ids for o in outs]
    for options in (dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, enable_expert_parallel=True)):
        split = llm_cache.get(tiny_qwen3_vl_moe, **options)
        assert [o.outputs[0].token_ids for o in split.generate(ps, greedy(10))] == expected, options


def test_moe_variant_loads_the_released_stacked_layout(tiny_qwen3_vl_moe, llm_cache, tmp_path):
    """Qwen3-VL-MoE's released checkpoints stack the experts transposed ([E, H, 2I], [E, I, H]); the same
    weights in that layout give the same tokens."""
    import shutil

    from safetensors.torch import load_file, save_file
    copy = tmp_path / "released"
    shutil.copytree(tiny_qwen3_vl_moe, copy)
    weights = load_file(str(copy / "model.safetensors"))
    stacked = [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert stacked
    save_file({k: v.transpose(1, 2).contiguous() if k in stacked else v for k, v in weights.items()},
              str(copy / "model.safetensors"), metadata={"format": "pt"})
    ps = [prompt(llm_cache.get(tiny_qwen3_vl_moe), [make_image(70, 45, 1)])]
    expected = [o.outputs[0].token_ids for o in llm_cache.get(tiny_qwen3_vl_moe).generate(ps, greedy(8))]
    from engine.llm import LLM
    released = LLM(str(copy), dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    assert [o.outputs[0].token_ids for o in released.generate(ps, greedy(8))] == expected
