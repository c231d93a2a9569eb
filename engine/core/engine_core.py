"""EngineCore: the step loop of one engine (scheduler + block manager + the executor's ranks).

`add_request` validates and queues; `step` schedules, runs one forward pass, appends sampled
tokens, applies the stop rules that need no text (EOS, stop token ids, lengths) and returns
per-request deltas. Text-level work (detokenising, stop strings) belongs to the output processor.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from engine.executor.base import make_executor
from engine.gguf import resolve_model_path
from engine.models.config import check_tensor_parallel, context_limit, load_model_config
from engine.multimodal.inputs import mrope_positions
from engine.pd.handoff import KVHandoff
from engine.spec_decode import ngram
from engine.spec_decode.verify import accepted_tokens, sample_rows
from engine.structured.grammar import GrammarCompiler
from engine.wire import EngineCoreOutput, EngineCoreRequest, TokenLogprobs
from engine.worker.model_runner import LaunchedStep

log = logging.getLogger(__name__)


def resolve_model(model: str, progress: bool) -> Path:
    """The HF folder to load: the embedded default, a checkpoint folder, a converted .gguf file, or a Hugging Face
    repo id (the local cache, else the hub)."""
    from engine.hub import looks_like_repo_id, resolve_repo_id
    try:
        if not model:
            from engine.default_model import default_model_path
            return default_model_path(progress=progress)
        if looks_like_repo_id(model):
            return resolve_repo_id(model)
        return resolve_model_path(model, progress=progress)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelNotFoundError(str(e), param="model") from None
    except ValueError as e:
        raise UnsupportedModelError(str(e), param="model") from None


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = False, on_worker_failure=None):
        self.config = config
        t0 = time.perf_counter()
        self.model_path = resolve_model(config.model, progress)
        self.model_config = load_model_config(self.model_path)
        limit = context_limit(self.model_config)
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise UnsupportedModelError(f"max_model_len {self.max_model_len} exceeds the model's {limit} positions",
                                        param="max_model_len")
        check_tensor_parallel(self.model_config, config.tensor_parallel_size, config.enable_expert_parallel,
                              config.data_parallel_size)
        self.executor = make_executor(config, self.model_path, self.max_model_len, progress, on_worker_failure)
        try:
            num_blocks = min(self.executor.collective_rpc("determine_num_blocks"))
            needed = -(-self.max_model_len // config.block_size)
            if num_blocks < needed:
                raise UnsupportedModelError(
                    f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, fewer than one "
                    f"max_model_len={self.max_model_len} sequence needs ({needed}); raise the KV budget or lower "
                    f"max_model_len", param="max_model_len")
            self.executor.collective_rpc("allocate_kv_pool", num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        multi_rank = self.executor.world_size > 1
        # data parallelism: each DP group has its own scheduler slice over its own KV pool (every rank's pool
        # holds num_blocks); the core schedules every slice each step
        self.slices = []
        spec = config.speculative()
        for _ in range(config.data_parallel_size):
            bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                              on_free=self.executor.on_free if multi_rank else None,
                              drop_last_hit=spec is not None and spec.method == "mtp")
            self.slices.append(Scheduler(bm, config.max_num_seqs, config.max_num_batched_tokens,
                                         config.enable_chunked_prefill, spec.lookahead_slots if spec else 0,
                                         self.max_model_len))
        # DP group 0's (the only one at data_parallel_size 1)
        self.scheduler = self.slices[0]
        self.block_manager = self.scheduler.block_manager
        self.kv_spec = self.runner.kv_spec
        self.handoff = KVHandoff([s.block_manager for s in self.slices], self.executor, self.kv_spec,
                                 config.kv_park_timeout_s, config.kv_pull_timeout_s)
        self.seqs: dict[str, Sequence] = {}
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.grammars = GrammarCompiler(self.model_path, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self._seed_rng = random.Random(config.seed)
        self.num_generated_tokens = 0
        self._in_flight: LaunchedStep | None = None  # the launched step not yet read back
        # speculative decoding: a step's drafts are proposed from its read-back tokens, so it is read back
        # before the next is scheduled
        self.spec = spec
        self.async_scheduling = config.async_scheduling and self.spec is None
        self.spec_draft_tokens = self.spec_accepted_tokens = self.spec_verify_rows = 0
        log.info("engine ready: %s, %d ranks, %d KV blocks x %d tokens, %.1fs", self.model_path.name,
                 self.executor.world_size, num_blocks, config.block_size, time.perf_counter() - t0)

    @property
    def runner(self):
        """Rank 0's model runner (its model, backend and pool; benchmarks and tests read it)."""
        return self.executor.driver.runner

    def shutdown(self) -> None:
        """Frees parked KV, stops the transfer endpoints and the other ranks' workers."""
        self.handoff.close()
        self.executor.shutdown()

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, request: EngineCoreRequest) -> None:
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if request.request_id in self.seqs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; this model's maximum context length is {self.max_model_len} "
                f"tokens, and at least one must remain for the output", param="prompt")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if request.params.n != 1:
            raise InvalidRequestError("engine requests carry n=1 (the front fans out n)", param="n")
        if request.params.prompt_logprobs is not None and len(self.slices) > 1:
            raise InvalidRequestError("prompt_logprobs are not computed at data_parallel_size > 1",
                                      param="prompt_logprobs")
        bias = request.params.logit_bias
        if bias and max(bias) >= vocab:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")

    def _attach_images(self, seq: Sequence, images) -> None:
        """A multimodal prompt's images, checked against its placeholder tokens, and its rope positions."""
        cfg = self.model_config
        if not images:
            return
        if cfg.vision is None:
            raise InvalidRequestError(f"this model ({cfg.architectures[0] if cfg.architectures else cfg.model_type}) "
                                      "does not take images", param="messages")
        prompt, end = seq.token_ids[:seq.num_prompt_tokens], 0
        for img in images:
            if (img.offset < end or img.end > len(prompt) or img.num_tokens <= 0
                    or any(t != cfg.image_token_id for t in prompt[img.offset:img.end])):
                raise InvalidRequestError("an image does not sit on its placeholder tokens", param="messages")
            end = img.end
        if sum(img.num_tokens for img in images) != prompt.count(cfg.image_token_id):
            raise InvalidRequestError("the prompt has image placeholder tokens without an image", param="messages")
        seq.images = list(images)
        seq.mrope_positions, seq.rope_delta = mrope_positions(len(prompt), seq.images, cfg.vision.spatial_merge_size)

    def _attach_grammar(self, seq: Sequence) -> None:
        """Structured outputs: the sequence's matcher, advanced past the output tokens it already has (a
        migrated sequence's first token)."""
        spec = seq.params.structured_outputs
        if spec is None:
            return
        seq.grammar = self.grammars.matcher(spec)
        for token in seq.output_token_ids:
            if not seq.grammar.accept(token):
                raise InvalidRequestError(f"token {token} does not fit the request's structured_outputs",
                                          param="structured_outputs")

    def add_request(self, request: EngineCoreRequest) -> Sequence:
        """Queues a request. With kv_transfer_params it is one half of a PD pair: `do_remote_decode`
        parks its KV after the first token; `migration` pulls a prefilled KV and continues decoding."""
        kv = request.kv_transfer_params or {}
        if kv.get("migration") is not None:
            return self._add_migrated(request, kv)
        self.validate(request)
        params = request.params
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        seq = Sequence(request.request_id, request.prompt_token_ids, params, seed,
                       self._max_output_tokens(params, len(request.prompt_token_ids)),
                       request.arrival_time or time.time())
        self._attach_images(seq, request.images)
        seq.remote_decode = bool(kv.get("do_remote_decode"))
        if seq.remote_decode and seq.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs do not cross a prefill/decode hand-off; ask a hybrid engine",
                                      param="prompt_logprobs")
        self._attach_grammar(seq)
        seq.dp_rank = self._least_loaded_slice()
        self.seqs[seq.seq_id] = seq
        self.slices[seq.dp_rank].add(seq)
        return seq

    def _least_loaded_slice(self) -> int:
        """The DP group to put a new request on: fewest running + waiting (+ KV pulls under way), then the
        emptiest KV pool."""
        if len(self.slices) == 1:
            return 0
        pulls = [0] * len(self.slices)
        for pull in self.handoff.pulls:
            pulls[pull.seq.dp_rank] += 1
        return min(range(len(self.slices)), key=lambda d: (self.slices[d].num_unfinished + pulls[d],
                                                            self.slices[d].block_manager.usage, d))

    def _slice(self, seq: Sequence) -> Scheduler:
        return self.slices[seq.dp_rank]

    def _add_migrated(self, request: EngineCoreRequest, kv: dict) -> Sequence:
        m = self.handoff.parse(kv)
        prompt = m.prompt_token_ids
        self.validate(EngineCoreRequest(request_id=request.request_id, prompt_token_ids=prompt + [m.first_token],
                                        params=m.params))
        seq = Sequence(request.request_id, prompt, m.params, m.sampling_seed,
                       self._max_output_tokens(m.params, len(prompt)),
                       request.arrival_time or time.time())
        seq.append_token(m.first_token)
        self._attach_images(seq, m.images)
        self._attach_grammar(seq)  # the decode side rebuilds the grammar state from the first token
        seq.dp_rank = self._least_loaded_slice()  # any DP group: the migration names the source's
        self.seqs[seq.seq_id] = seq
        self.handoff.admit(seq, m)
        return seq

    def _max_output_tokens(self, params, prompt_len: int) -> int:
        """max_tokens, capped by the context left after the prompt (None: all of it)."""
        room = self.max_model_len - prompt_len
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def free_parked(self, seq_ids) -> int:
        """Router's /pd/free: releases KV parked for a decode engine (idempotent)."""
        return self.handoff.free(seq_ids)

    def abort(self, request_ids) -> None:
        """Ends the requests and frees their KV at once (the caller already knows they are gone)."""
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is not None and not self.handoff.cancel(seq):
                self._slice(seq).finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def num_unfinished(self) -> int:
        return sum(s.num_unfinished for s in self.slices)

    @property
    def num_waiting(self) -> int:
        return sum(len(s.waiting) for s in self.slices)

    def seconds_until_work(self) -> float:
        """0 when a step has something to do (sequences to schedule, a launched step to read back); else the
        seconds until the KV hand-off's next timer (inf: none), which a server loop may sleep through."""
        if self.num_unfinished or self._in_flight is not None:
            return 0.0
        return self.handoff.seconds_until_work()

    # ---- one step ----------------------------------------------------------------------------
    def stop_ids(self, seq: Sequence) -> list[int]:
        ids = set(seq.params.stop_token_ids or ())
        if not seq.params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    def step(self) -> list[EngineCoreOutput]:
        """Schedules and launches one step, then reads back the previous one (async scheduling: the
        device runs this step while the host turns the previous step's samples into outputs and
        comes back to schedule the next). Without async scheduling a step is read back at once."""
        outputs = self._advance_handoff()
        if self._in_flight is not None and any(seq.grammar is not None for seq in self._in_flight.seqs):
            # a constrained row's next mask needs the token in flight: read the step back before the next
            outputs.extend(self._read_back(self._in_flight))
            self._in_flight = None
        plans = [s.schedule() for s in self.slices]
        outputs.extend(self._fail_unrecomputable(plan.preempted for plan in plans))
        scheduled = [plan.scheduled for plan in plans]
        launched = self._launch(scheduled) if any(scheduled) else None
        if self._in_flight is not None:
            outputs.extend(self._read_back(self._in_flight))
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            outputs.extend(self._read_back(launched))
            self._in_flight = None
        if self._in_flight is not None and all(seq.is_finished for seq in self._in_flight.seqs):
            self._in_flight = None  # its samples are all dropped: nothing to wait for
        return outputs

    def _fail_unrecomputable(self, preempted) -> list[EngineCoreOutput]:
        """A preempted sequence that cannot recompute its prompt (a migrated one with images) ends with an error."""
        outputs = []
        for seq in (seq for group in preempted for seq in group if not seq.can_recompute):
            self._slice(seq).finish(seq, "error")
            self.seqs.pop(seq.seq_id, None)
            out = self._output(seq, [])
            out.error = ("preempted: a decode engine cannot recompute a migrated prompt's images; give it more KV "
                         "cache (or fewer concurrent requests)")
            outputs.append(out)
        return outputs

    def _launch(self, per_slice: list) -> LaunchedStep | None:
        """One step over every DP group's rows (rows in DP order; a group without rows runs the idle step)."""
        scheduled = [s for rows in per_slice for s in rows]
        dp_rows = [len(rows) for rows in per_slice] if len(per_slice) > 1 else None
        step = self.executor.launch(scheduled, self.stop_ids, self._in_flight, dp_rows)
        rows = self.runner.prompt_logprob_rows
        if rows:  # in row order, each sequence's span of its chunk
            it = iter(rows)
            for s in scheduled:
                lo, hi = s.seq.prompt_logprob_span(s.seq.num_computed_tokens, s.num_new_tokens)
                if hi > lo:
                    s.seq.prompt_logprobs.extend(itertools.islice(it, hi - lo))
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens  # drafts too: verification takes the rejected back
            s.seq.spec_token_ids = s.spec_token_ids  # the drafts fed (the budget may have dropped them)
            if not s.samples:  # a prefill chunk: its full blocks are reusable already
                self._slice(s.seq).block_manager.cache_full_blocks(s.seq)
        for row, seq in enumerate(step.seqs if step is not None else ()):
            seq.num_pending_tokens += 1
            seq.pending_row = row
        return step

    def _read_back(self, step: LaunchedStep) -> list[EngineCoreOutput]:
        """Appends a launched step's samples and applies the stop rules. Sequences that finished
        (or were aborted) while it was in flight drop their sample."""
        result = step.fetch()
        token_ids = result.token_ids.tolist()
        drafts = [seq.spec_token_ids for seq in step.seqs]
        mtp_drafts = result.draft_ids.tolist() if result.draft_ids is not None else None
        logprobs = _logprob_rows(result, sample_rows(step.seqs, map(len, drafts)))
        outputs = []
        row = 0
        for i, (seq, fed) in enumerate(zip(step.seqs, drafts)):
            first, row = row, row + 1 + len(fed)
            seq.num_pending_tokens -= 1
            if seq.is_finished:
                continue
            kept = accepted_tokens(token_ids[first:row], fed)
            if fed:  # the rejected drafts' KV is dropped: the next step writes over it
                seq.num_computed_tokens -= len(fed) + 1 - len(kept)
                self.spec_draft_tokens += len(fed)
                self.spec_accepted_tokens += len(kept) - 1
                self.spec_verify_rows += 1
            new = []
            for token in kept:
                seq.append_token(token)
                new.append(token)
                self.num_generated_tokens += 1
                self._check_stop(seq, token)
                if seq.grammar is not None and not seq.is_finished:
                    self._advance_grammar(seq, token)
                if seq.is_finished:
                    break
            new_lp = (logprobs[first:first + len(new)] if logprobs is not None and seq.params.logprobs is not None
                      else None)
            if seq.remote_decode and not seq.is_finished:
                outputs.append(self._park(seq, new_lp[0] if new_lp else None))
                continue
            if seq.is_finished:
                self.seqs.pop(seq.seq_id, None)
            else:
                self._slice(seq).block_manager.cache_full_blocks(seq)
                seq.spec_token_ids = self._propose(seq, mtp_drafts[i] if mtp_drafts is not None else [])
            outputs.append(self._output(seq, new, new_lp))
        return outputs

    def _propose(self, seq: Sequence, mtp_drafts: list[int]) -> list[int]:
        """The drafts the next step feeds after the sequence's last token: the MTP module's (`mtp_drafts`, made
        by the step just read back; -1 past where its chain stopped) or the ngram lookup's. None without
        speculative decoding, for requests whose
        sampling looks at earlier outputs or follows a grammar, and past the length limits."""
        spec = self.spec
        if spec is None or seq.grammar is not None or seq.params.repetition_penalty != 1.0 \
                or seq.params.presence_penalty or seq.params.frequency_penalty:
            return []
        room = min(seq.max_output_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1
        k = min(spec.num_speculative_tokens, room)
        if k <= 0:
            return []
        if spec.method == "mtp":
            return list(itertools.takewhile(lambda t: t >= 0, mtp_drafts))[:k]
        return ngram.propose(seq.token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)

    def _advance_handoff(self) -> list[EngineCoreOutput]:
        outputs = []
        if not self.handoff.busy:
            return outputs
        self.handoff.reclaim_expired()
        ready, failed = self.handoff.poll()
        for seq, first_logprobs in ready:  # KV landed: decode from here; the client gets the first token now
            self._slice(seq).adopt(seq)
            outputs.append(self._output(seq, [seq.token_ids[-1]], [first_logprobs] if first_logprobs else None))
        for seq, error in failed:
            self.seqs.pop(seq.seq_id, None)
            seq.finish_reason = "error"
            out = self._output(seq, [])
            out.error = error
            outputs.append(out)
        return outputs

    def _park(self, seq: Sequence, first_logprobs: TokenLogprobs | None) -> EngineCoreOutput:
        """Prefill half: the answer is the migration descriptor (with the first token and its logprobs); the
        KV waits for the decode engine."""
        self.seqs.pop(seq.seq_id, None)
        self._slice(seq).block_manager.cache_full_blocks(seq)
        self._slice(seq).release(seq, "length")
        out = self._output(seq, [])
        try:
            out.kv_transfer_params = self.handoff.park(seq, self.config.model, first_logprobs)
        except RuntimeError as e:  # no staging room: fail this request, keep serving
            self._slice(seq).block_manager.free(seq)
            out.finish_reason, out.error = "error", f"cannot hand off KV: {e}"
        return out

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(seq, "stop", token)
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop", None)
        if seq.num_output_tokens >= seq.max_output_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length")

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """A finished grammar ends the sequence (its stop token, or nothing more can follow)."""
        if not seq.grammar.accept(token):
            log.warning("event=grammar_rejected request=%s token=%d", seq.seq_id, token)
            return self._finish(seq, "stop")
        if seq.grammar.terminated:
            self._finish(seq, "stop")

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        # blocks are published to the prefix cache before they go back to the pool
        self._slice(seq).block_manager.cache_full_blocks(seq)
        self._slice(seq).finish(seq, reason, stop_reason)

    def _output(self, seq: Sequence, new_tokens: list[int], logprobs=None) -> EngineCoreOutput:
        first = bool(new_tokens) and seq.num_output_tokens == len(new_tokens)
        return EngineCoreOutput(request_id=seq.seq_id, new_token_ids=new_tokens, new_logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
                                queue_time_s=seq.queue_time if first else None,
                                prompt_logprobs=seq.prompt_logprobs if first else None)

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Summed over the DP groups' slices (KV usage: the fullest group's)."""
        bms = [s.block_manager for s in self.slices]
        return {"num_running": sum(len(s.running) for s in self.slices), "num_waiting": self.num_waiting,
                "num_blocks": sum(b.num_blocks for b in bms), "num_free_blocks": sum(b.num_free_blocks for b in bms),
                "kv_usage": max(b.usage for b in bms), "prefix_cache_queries": sum(b.prefix_queries for b in bms),
                "prefix_cache_hits": sum(b.prefix_hits for b in bms),
                "num_preemptions": sum(s.num_preemptions for s in self.slices),
                "num_parked": len(self.handoff.parked), "num_pulling": len(self.handoff.pulls),
                "num_generated_tokens": self.num_generated_tokens, "spec_draft_tokens": self.spec_draft_tokens,
                "spec_accepted_tokens": self.spec_accepted_tokens, "spec_verify_rows": self.spec_verify_rows,
                **self.handoff.metrics()}


def _logprob_rows(result, seqs) -> list[TokenLogprobs] | None:
    if result.logprobs is None:
        return None
    lps, ranks = result.logprobs.tolist(), result.ranks.tolist()
    top_ids = result.top_ids.tolist() if result.top_ids is not None else None
    top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    rows = []
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs or 0
        rows.append(TokenLogprobs(lps[i], ranks[i], top_ids[i][:n] if n else [], top_lps[i][:n] if n else []))
    return rows
