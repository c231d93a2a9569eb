"""OutputProcessor: turns engine-core deltas into RequestOutputs (detokenised text, logprobs, stop
strings, n-way fan-in). Shared by the offline LLM and the HTTP front."""
from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.wire import EngineCoreOutput, EngineCoreRequest


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


@dataclass
class _Child:
    parent: "RequestState"
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    completion: CompletionOutput


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.output = RequestOutput(request_id, prompt, prompt_token_ids,
                                    [CompletionOutput(index=i) for i in range(params.n)])
        self.params = params
        self.num_unfinished = params.n


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.children: dict[str, _Child] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float = 0.0, images: list | None = None
                    ) -> list[EngineCoreRequest]:
        """Registers the request and returns its n engine-core requests (one per sample)."""
        state = RequestState(request_id, prompt, prompt_token_ids, params)
        requests = []
        for i in range(params.n):
            cp = params.child(i)
            cid = child_id(request_id, i, params.n)
            detok = IncrementalDetokenizer(self.tokenizer, cp.skip_special_tokens, cp.stop, cp.include_stop_str_in_output)
            completion = state.output.outputs[i]
            if cp.logprobs is not None:
                completion.logprobs, completion.cumulative_logprob = [], 0.0
            self.children[cid] = _Child(state, i, cp, detok, completion)
            requests.append(EngineCoreRequest(request_id=cid, prompt_token_ids=prompt_token_ids, params=cp,
                                              arrival_time=arrival_time, images=images or None))
        return requests

    def child_ids(self, request_id: str) -> list[str]:
        return [cid for cid, c in self.children.items() if c.parent.output.request_id == request_id]

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Applies deltas. Returns the request outputs that changed and the child ids that a stop
        string finished (the caller aborts those in the engine core)."""
        changed: dict[str, RequestOutput] = {}
        to_abort: list[str] = []
        for out in outputs:
            child = self.children.get(out.request_id)
            if child is None:
                continue  # aborted by us earlier, or unknown
            c, params = child.completion, child.params
            c.token_ids.extend(out.new_token_ids)
            if out.new_logprobs and c.logprobs is not None:
                for token, lp in zip(out.new_token_ids, out.new_logprobs):
                    c.logprobs.append(self._entry(token, lp))
                    c.cumulative_logprob += lp.logprob
            request = child.parent.output
            if out.prompt_logprobs is not None and request.prompt_logprobs is None:
                request.prompt_logprobs = [None] + [self._entry(t, lp) for t, lp in
                                                    zip(request.prompt_token_ids[1:], out.prompt_logprobs)]
            stop = child.detok.add_tokens(out.new_token_ids, check_stop=len(c.token_ids) >= params.min_tokens)
            c.text = child.detok.text
            if stop is not None and out.finish_reason is None:
                c.finish_reason, c.stop_reason = "stop", stop
                to_abort.append(out.request_id)
            elif out.finish_reason is not None:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
            state = child.parent
            state.output.num_cached_tokens = max(state.output.num_cached_tokens, out.num_cached_tokens)
            if c.finish_reason is not None:
                del self.children[out.request_id]
                state.num_unfinished -= 1
                state.output.finished = state.num_unfinished == 0
            changed[state.output.request_id] = state.output
        return list(changed.values()), to_abort

    def _entry(self, token: int, lp) -> dict[int, Logprob]:
        """A token's logprobs as vLLM shapes them: its top-N alternatives (ranks 1..N), then the token itself."""
        entry = {tid: Logprob(v, r + 1, self.tokenizer.decode([tid]))
                 for r, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        entry[token] = Logprob(lp.logprob, lp.rank, self.tokenizer.decode([token]))
        return entry

    def abort(self, request_id: str) -> list[str]:
        """Forgets a request; returns its unfinished child ids for the engine core to abort."""
        ids = self.child_ids(request_id)
        for cid in ids:
            child = self.children.pop(cid)
            child.completion.finish_reason = "abort"
        return ids
