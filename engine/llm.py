"""LLM: the offline API, shaped as vLLM's (`LLM(model, **options).generate(prompts, params)`)."""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence as Seq


from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import InvalidRequestError
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer

PromptType = str | list[int] | dict


class LLM:
    def __init__(self, model: str = "", *, progress: bool = False, **options):
        self.config = EngineConfig.from_kwargs(model=model, **options)
        self.engine = EngineCore(self.config, progress=progress)
        self.tokenizer = load_tokenizer(self.config.tokenizer or self.engine.model_path)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---- input ---------------------------------------------------------------------------------
    def _normalise(self, prompts) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return list(prompts)

    def _tokenise(self, prompt: PromptType) -> tuple[str | None, list[int], list]:
        """(text, token ids, images). A dict prompt may carry vLLM's `multi_modal_data: {"image": img | [img]}`
        (PIL images or image file paths), one image placeholder token in the prompt per image."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt), []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            else:
                text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            images = (prompt.get("multi_modal_data") or {}).get("image")
            if not images:
                return text, ids, []
            return (text, *self._place_images(ids, images if isinstance(images, (list, tuple)) else [images]))
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt), []
        raise InvalidRequestError("a prompt is a string, a list of token ids or {'prompt_token_ids': [...]}",
                                  param="prompt")

    def _place_images(self, ids: list[int], images: list) -> tuple[list[int], list]:
        cfg = self.engine.model_config
        if cfg.vision is None:
            raise InvalidRequestError("this model does not take images", param="multi_modal_data")
        from engine.multimodal.processor import place_images
        # the geometry rank 0's runner read from the checkpoint (this process holds it)
        return place_images(ids, list(images), self.engine.runner.image_config, cfg.image_token_id)

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> str:
        """Queues one request (all n samples) after validating it; returns its id."""
        text, ids, images = self._tokenise(prompt)
        request_id = request_id or str(next(self._ids))
        requests = self.processor.add_request(request_id, text, ids, params, images=images)
        try:
            for r in requests:
                self.engine.validate(r)
        except Exception:
            self.processor.abort(request_id)
            raise
        for r in requests:
            self.engine.add_request(r)
        return request_id

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        changed, to_abort = self.processor.process(self.engine.step())
        self.engine.abort(to_abort)
        return changed

    def generate_stream(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Yields a request's (cumulative) output every time it changes, in step order."""
        prompts = self._normalise(prompts)
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("one SamplingParams per prompt, or a single one", param="sampling_params")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.add_request(prompt, p))
        except Exception:
            self.abort(ids)
            raise
        pending = set(ids)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            if pending:  # the consumer stopped early: free what it left running
                self.abort(list(pending))

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = self._normalise(prompts)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm  # imported for the bar alone: `import engine` needs no tqdm
            bar = tqdm(total=len(prompts), desc="generating")
        for out in self.generate_stream(prompts, sampling_params):
            if out.finished:
                final[out.request_id] = out
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [final[k] for k in sorted(final, key=int)]

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} messages) or a list of them,
        rendered by the model's chat template, then generated like `generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; use generate()")
        prompts = [{"prompt_token_ids": list(self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            **(chat_template_kwargs or {})))} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the checkpoint's generation_config.json defaults (temperature, top_p, ...) when it has them."""
        from engine.generation_defaults import generation_defaults
        return SamplingParams(**generation_defaults("auto", self.engine.model_path))

    def get_tokenizer(self):
        return self.tokenizer

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(self.processor.abort(rid))

    def shutdown(self) -> None:
        """Stops the engine's other ranks (tensor parallelism) and its KV endpoints."""
        self.engine.shutdown()
