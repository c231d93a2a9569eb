"""`slipstream generate [--model M] PROMPT`: offline one-shot generation (chat-templated when the
tokenizer has a template), printing the completion."""
from __future__ import annotations

import argparse
import sys

from engine.cli.args import add_config_args, config_from_args
from engine.config import EngineConfig
from engine.errors import EngineError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion offline (default: the embedded model)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="", help="HF folder, .gguf file or Hugging Face repo id (default: "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_config_args(p, EngineConfig, skip=("model",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    try:
        config = config_from_args(EngineConfig, args, model=args.model)
        llm = LLM(progress=True, **{k: v for k, v in vars(config).items()})
        prompt = args.prompt
        if not args.raw and llm.tokenizer.chat_template:
            prompt = {"prompt_token_ids": llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False)}
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        out = llm.generate(prompt, params)[0]
    except EngineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(out.outputs[0].text.strip())
    return 0
