"""Structured outputs (xgrammar): a random-weights model with the real Qwen3 tokenizer, constrained by JSON
schemas, regexes, choices and grammars, returns valid output for every seed — offline, under n = 4, with and
without async scheduling and prefix caching, through the server with the official `openai` client, and in
1P1D (the decode engine rebuilds the grammar state from the first token)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampling.sampler import apply_token_bitmask, random_uniform
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams as S

from tests.support.server import start_server

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                           "maximum": 1}},
     "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "email": {"type": "string", "maxLength": 10}},
        "required": ["id"], "additionalProperties": False}, "kind": {"const": "person"}},
     "required": ["user", "kind"], "additionalProperties": False},
]
SEEDS = range(20)
MAX_TOKENS = 120


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


@pytest.fixture(scope="module")
def llm(llm_cache, tiny_qwen3_real_tok):
    return llm_cache.get(tiny_qwen3_real_tok)


# ---- pieces ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, param", [
    (dict(), "structured_outputs"),
    (dict(regex="a", choice=["b"]), "structured_outputs"),
    (dict(choice=[]), "structured_outputs.choice"),
])
def test_exactly_one_constraint(bad, param):
    with pytest.raises(InvalidRequestError) as e:
        S(**bad)
    assert e.value.param == param


@pytest.mark.parametrize("spec, param, words", [
    (S(json={"type": "nonsense"}), "structured_outputs.json", "nonsense"),
    (S(json="{not json"), "structured_outputs.json", "JSON schema"),
    (S(regex="[a-"), "structured_outputs.regex", "Unclosed"),
    (S(grammar="root ::= "), "structured_outputs.grammar", "grammar"),
])
def test_bad_constraints_name_the_field(spec, param, words):
    with pytest.raises(InvalidRequestError) as e:
        spec.check()
    assert e.value.param == param and words in e.value.message and "/project/" not in e.value.message


def test_bitmask_expansion_matches_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    g = torch.Generator().manual_seed(0)
    for V in (31, 32, 33, 1000, 151680):
        logits = torch.randn(3, V, generator=g)
        words = torch.randint(-(1 << 31), 1 << 31, (3, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, words, backend="torch_native")
        assert torch.equal(apply_token_bitmask(logits, words), expected)


def test_uniforms_stay_below_one():
    """Regression: with 24 random bits the top value rounded to 1.0, whose noise is 0, and that token won the
    draw whatever its probability (or, masked, gave NaN). Seed 1, step 0 hit it on a 151,680-token vocab."""
    u = random_uniform(torch.tensor([1, 3, 12345]), torch.tensor([0, 0, 7]), 151680)
    assert float(u.max()) < 1.0 and float(u.min()) > 0.0


# ---- offline engine --------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_holds_for_every_seed(llm, index):
    schema = SCHEMAS[index]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, structured_outputs=S(json=schema))
              for s in SEEDS]
    outs = llm.generate(["Tell me about yourself."] * len(params), params)
    bad = [o.outputs[0].text for o in outs if not valid(o.outputs[0].text, schema)]
    assert not bad, bad
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)


@pytest.mark.parametrize("options", [dict(async_scheduling=False), dict(enable_prefix_caching=True)],
                         ids=["sync", "prefix-cache"])
def test_n4_with_scheduling_options(llm_cache, tiny_qwen3_real_tok, options):
    llm = llm_cache.get(tiny_qwen3_real_tok, **options)
    schema = SCHEMAS[2]
    for seed in range(3):  # the second and third share the prompt prefix with the first (prefix cache hits)
        out = llm.generate(["A shared prompt prefix, then a JSON answer:"],
                           SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                                          structured_outputs=S(json=schema)))[0]
        assert len(out.outputs) == 4
        assert all(valid(c.text, schema) for c in out.outputs), [c.text for c in out.outputs]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_regex_choice_grammar_and_json_object(llm):
    specs = [S(regex=r"\d{3}-[a-z]{2,4}"), S(choice=["yes", "no", "maybe not"]),
             S(grammar='root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"'), S(json_object=True)]
    outs = llm.generate(["Answer:"] * (4 * len(specs)),
                        [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=spec)
                         for spec in specs for s in range(4)])
    texts = [o.outputs[0].text for o in outs]
    assert all(re.fullmatch(r"\d{3}-[a-z]{2,4}", t) for t in texts[0:4]), texts[0:4]
    assert all(t in ("yes", "no", "maybe not") for t in texts[4:8]), texts[4:8]
    assert all(re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)", t) for t in texts[8:12]), texts[8:12]
    # json_object: any object; the random model may run out of tokens, but what it wrote so far is JSON-shaped
    assert all(t.startswith("{") for t in texts[12:16]), [t[:20] for t in texts[12:16]]


def test_unconstrained_rows_in_the_same_batch_are_untouched(llm):
    """A constrained request in the batch does not change its neighbours' greedy tokens."""
    alone = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids
    mixed = llm.generate(["Hello there", "Answer:"], [SamplingParams(temperature=0, max_tokens=12),
                                                      SamplingParams(temperature=0, max_tokens=12,
                                                                     structured_outputs=S(choice=["A", "B"]))])
    assert mixed[0].outputs[0].token_ids == alone
    assert mixed[1].outputs[0].text in ("A", "B")


def test_logit_bias_steers_greedy_tokens(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                 logit_bias={1234: 100.0}))[0]
    assert out.outputs[0].token_ids == [1234] * 4


# ---- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_qwen3_real_tok, tmp_path_factory):
    s = start_server(tiny_qwen3_real_tok, tmp_path_factory.mktemp("so-server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_response_format_json_schema_with_n4(client, server):
    schema = SCHEMAS[0]
    r = client.chat.completions.create(
        model=str(server_model(server)), messages=[{"role": "user", "content": "Who are you?"}], n=4, seed=7,
        max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": schema, "strict": True}})
    assert len(r.choices) == 4
    assert all(valid(c.message.content, schema) for c in r.choices), [c.message.content for c in r.choices]
    server.wait_kv_free()


def test_vllm_spellings_and_completions(client, server):
    model = server_model(server)
    r = client.completions.create(model=model, prompt="Pick:", max_tokens=20, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model=model, prompt="Code:", max_tokens=20, seed=2,
                                  extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=60,
                                       seed=3, extra_body={"guided_json": SCHEMAS[1]})
    assert valid(r.choices[0].message.content, SCHEMAS[1])
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=MAX_TOKENS, seed=4, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": SCHEMAS[3]}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert valid(text, SCHEMAS[3]), text


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "structured_outputs.json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(server, extra, param):
    body = {"model": server_model(server), "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
    status, err = server.post_json("/v1/chat/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == param, err
    status, ok = server.post_json("/v1/chat/completions", {**body, **{k: None for k in extra}})
    assert status == 200, ok


def server_model(server) -> str:
    return server.get_json("/v1/models")[1]["data"][0]["id"]
