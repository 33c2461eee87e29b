"""The sampler: per-sequence sampling state and one batched draw per step.

Owns what sampling remembers about a sequence between steps (its SamplingParams, its prompt's
token set for repetition_penalty, its generated tokens for presence/frequency penalties and
min_tokens, its seeded torch.Generator) and turns one step's logits into `SampledTokens`.
Torch only: must not import the scheduler (engine/core is driven by the runner, not by us) nor
anything of the service.

Per step, in this order (vLLM's conventions):
  1. logit_bias is added to the raw logits;
  2. repetition_penalty (prompt and output tokens), then presence/frequency penalties (output
     tokens only, as OpenAI defines them);
  3. min_tokens: until a sequence has that many output tokens, its stop_token_ids and (unless
     ignore_eos) the EOS ids are set to -inf; a sequence with a grammar (structured outputs) has
     every token its grammar does not allow next set to -inf (grammar.py);
  4. greedy rows (temperature == 0) take the argmax (ties: lowest id); the others divide by the
     temperature, keep top_k, then top_p over what is left, then min_p, and draw from the softmax.
Logprobs handed to users are log_softmax of the RAW model logits (vLLM's default): before
logit_bias, penalties, temperature and filters. This is what lm-eval's loglikelihood needs.

ignore_eos is not this module's business beyond step 3: whether EOS ends a sequence is the engine
loop's stop check.

Seeds: a sequence whose params carry a seed draws its tokens by inverse CDF, each from one
uniform number of its own stream: the k-th number of a sequence is splitmix64 of its choice seed
and k (`_SeqState.next_uniform`, one per sampled, non-greedy step), so its tokens depend on
nothing but its seed, its choice index and its logits: not on its batch neighbours, its row
position or the device. Unseeded rows take theirs from one torch generator that they share.
Every draw is one number per row, where an exponential race (the Gumbel-max trick) needs a
vector of the vocabulary's size per row (measured in docs/benchmarks.md, "The engine's start-up,
and the sampler's draws, on a CPU"). On a GPU the unfiltered rows take a fused draw (`draw`:
triton_draw.py, else flashinfer's), the rest the torch ops here.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tokabatch.engine.api import SamplingParams, TokenLogprob
from tokabatch.engine.core.plan import SampledTokens
from tokabatch.engine.runtime import sampling_ops as ops
from tokabatch.engine.runtime.grammar import Grammars
from tokabatch.errors import InvalidRequest

_MASK64 = (1 << 64) - 1
Draw = Callable[[Tensor, "Tensor | float", torch.Generator], Tensor]   # (logits, 1 / temperature, generator) -> tokens


def choice_seed(seed: int, choice_index: int) -> int:
    """The seed of choice `choice_index` of a request seeded with `seed` (a uint64).

    Choice 0 uses the seed itself; the others mix in their index (splitmix64) so the n choices of
    one seeded request differ from each other yet reproduce run after run.
    """
    if choice_index == 0:
        return seed & _MASK64
    return _mix64(seed + 0x9E3779B97F4A7C15 * choice_index)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a uint64 whose bits each depend on every bit of `z` (mod 2**64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_STREAM_STEP = 0xD1B54A32D192ED03        # odd; not choice_seed's constant, so streams and seeds stay apart


@dataclass(slots=True)
class _SeqState:
    params: SamplingParams
    stream: int | None                   # a seeded row's stream key (from choice_seed); None: the shared generator
    prompt_ids: Tensor | None            # [n] long on the device, unique; only with repetition_penalty
    bias_ids: Tensor | None              # [m] long on the device
    bias_values: Tensor | None           # [m] float32 on the device
    blocked_ids: tuple[int, ...]         # masked while fewer than min_tokens outputs exist
    matcher: Any = None                  # the grammar's llguidance matcher (grammar.py), None: unconstrained
    output_ids: list[int] = field(default_factory=list)
    draws: int = 0                       # how many numbers of its stream a seeded row has drawn
    # "greedy" / "draw" (shared generator, no top_k/top_p/min_p) when the raw logits are always what
    # is sampled and no logprobs are asked for; "" otherwise. Set at registration (never changes).
    fast_kind: str = ""

    def next_uniform(self) -> float:
        """The next number in [0, 1) of a seeded row's stream (53 random bits)."""
        self.draws += 1
        return (_mix64(self.stream + _STREAM_STEP * self.draws) >> 11) * 2.0 ** -53

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0

    @property
    def unadjusted(self) -> bool:
        """Nothing of steps 1-3 applies this step: the raw logits are what is sampled from."""
        return self.bias_ids is None and not self.penalized and not self.min_tokens_pending and self.matcher is None

    @property
    def only_grammar(self) -> bool:
        """A constrained row that nothing else of steps 1-3 adjusts: its mask can be applied on the
        device without waiting for it (Sampler.sample_async)."""
        return self.matcher is not None and self.bias_ids is None and not self.penalized and \
            not self.min_tokens_pending

    @property
    def min_tokens_pending(self) -> bool:
        return bool(self.blocked_ids) and len(self.output_ids) < self.params.min_tokens


def no_samples() -> SampledTokens:
    return SampledTokens([], [])


class PendingSample:
    """Sampler.sample_async's draw: `draw()` launches it if it was held back (its constrained rows'
    masks were not waited for yet); calling it waits for the tokens (drawing first if needed)."""

    __slots__ = ("_finish", "_draw")

    def __init__(self, finish: Callable[[], SampledTokens], draw: Callable[[], None] | None = None) -> None:
        self._finish, self._draw = finish, draw

    def draw(self) -> None:
        if self._draw is not None:
            self._draw()

    def __call__(self) -> SampledTokens:
        return self._finish()


class Sampler:
    """Samples one token per row of a step's logits, remembering what penalties need.

    Usage by the runner: `register` a sequence when it is admitted (once, even if it is preempted
    and recomputed later), `sample` whenever its last position has logits, `release` when it
    finishes or is aborted. `sample` records the token it returns as the sequence's next output
    token; `append_output` exists only for tokens that did not come from `sample`.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, eos_token_ids: tuple[int, ...],
                 *, seed: int | None = None, draw: Draw | None = None) -> None:
        """`seed` seeds the generator shared by unseeded rows (None: from the OS). `draw` replaces the
        torch draw (softmax, then sampling_ops.draw_by_inverse_cdf) for the rows that draw from the raw
        logits with the shared generator: (logits, inv_temperature, generator) -> tokens
        (triton_draw.draw_from_logits, flashinfer_kernels.draw_from_logits)."""
        self.vocab_size = vocab_size
        self._draw = draw
        self.device = torch.device(device)
        self.eos_token_ids = tuple(eos_token_ids)
        self._shared = torch.Generator(device=self.device)
        if seed is None:
            self._shared.seed()
        else:
            self._shared.manual_seed(seed & _MASK64)
        self._states: dict[int, _SeqState] = {}
        # The last step's rows: its seq_ids list (held, so the object is not reused), their states and
        # their common fast kind. A step of the same list object (the scheduler's steady decode batch
        # passes one list while the rows stay the same) takes them without a lookup per row.
        self._last_rows: tuple[list[int], list[_SeqState], str] | None = None
        self.grammars: Grammars | None = None     # set by the factory, which knows the tokenizer
        # The grammar thread's job for the constrained rows' next step: those rows' matchers, being
        # advanced by the last tokens and then making their masks (Grammars.advance_async).
        self._next_masks: tuple[list, Future] | None = None

    # -- per-sequence state ---------------------------------------------------------------------

    def warm_up(self, logits: Tensor) -> None:
        """Run the replacement draw once per temperature form (one float, one per row) on a throwaway
        generator, so a draw compiled at first use (triton_draw.py) is ready before the first request."""
        if self._draw is None:
            return
        generator = torch.Generator(device=self.device)
        self._draw(logits, 1.0, generator)
        self._draw(logits, self._float([1.0] * len(logits)), generator)

    def register(self, seq_id: int, params: SamplingParams, prompt_ids: Sequence[int],
                 *, choice_index: int = 0) -> None:
        """Start tracking a sequence. `choice_index` (0..n-1) separates the n choices of one seeded request.

        Raises InvalidRequest for parameters the model cannot honour (e.g. a logit_bias id outside
        the vocabulary), ValueError when `seq_id` is already registered.
        """
        if seq_id in self._states:
            raise ValueError(f"sequence {seq_id} is already registered with the sampler")
        try:
            params.validate(self.vocab_size)
        except ValueError as exc:
            param, message = exc.args if len(exc.args) == 2 else (None, str(exc))
            raise InvalidRequest(message, param=param) from exc
        stream = None if params.seed is None else _mix64(choice_seed(params.seed, choice_index))
        prompt = None
        if params.repetition_penalty != 1.0:
            prompt = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long).to(self.device)
        bias_ids = bias_values = None
        if params.logit_bias:
            bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long).to(self.device)
            bias_values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32).to(self.device)
        blocked = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        state = _SeqState(params, stream, prompt, bias_ids, bias_values,
                          tuple(sorted(set(blocked))) if params.min_tokens > 0 else ())
        if params.grammar is not None:
            if self.grammars is None:
                raise InvalidRequest("This engine cannot constrain outputs to a grammar.", param="response_format")
            state.matcher = self.grammars.matcher(params.grammar)
        if state.unadjusted and not state.blocked_ids and params.logprobs is None:
            if params.greedy:
                state.fast_kind = "greedy"
            elif stream is None and not self._filtered(params):
                state.fast_kind = "draw"
        self._states[seq_id] = state

    def release(self, seq_id: int) -> None:
        """Forget a finished or aborted sequence (a no-op for an unknown id)."""
        state = self._states.pop(seq_id, None)
        self._last_rows = None
        if state is not None and state.matcher is not None:
            self.grammars.release(state.matcher)

    def append_output(self, seq_id: int, token_id: int) -> None:
        """Count a token as generated by `seq_id` that did NOT come from `sample` (which records its own).

        Counted tokens feed presence/frequency/repetition penalties, the min_tokens check and the grammar.
        """
        state = self._state(seq_id)
        state.output_ids.append(token_id)
        if state.matcher is not None:
            self._drop_next_masks()
            state.matcher.consume_token(token_id)

    def num_outputs(self, seq_id: int) -> int:
        """How many output tokens the sampler has counted for `seq_id`."""
        return len(self._state(seq_id).output_ids)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def _state(self, seq_id: int) -> _SeqState:
        try:
            return self._states[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} is not registered with the sampler") from None

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, seq_ids: list[int], logits: Tensor) -> SampledTokens:
        """Draw one token per row and record it as that sequence's next output token.

        seq_ids: row i's sequence (distinct ids). logits: [rows, vocab] on the sampler's device,
        float32 (bf16/fp16 is cast; the tensor is not modified). Returns SampledTokens: one per row,
        in row order, with a TokenLogprob when the sequence asked for logprobs (logprob of the
        sampled token under log_softmax of the raw logits, plus the top `params.logprobs`).
        """
        return self.sample_async(seq_ids, logits)()

    def sample_async(self, seq_ids: list[int], logits: Tensor) -> PendingSample:
        """`sample` in two halves: launch the draw now, get the tokens from the returned callable.

        On CUDA the draw's kernels and the copy of the tokens to pinned host memory are queued and
        this returns at once, so the caller can do CPU work while the GPU finishes; calling the
        result waits for the copy and records the tokens (call it before this sampler's next
        `sample*`: penalties and min_tokens read the recorded tokens). A step with constrained
        rows holds its draw back until the result's `draw()` (or the call): the draw waits for
        their masks, and the caller may first read another sampler's tokens so that their grammar
        job queues behind this one's (pipelined_loop.py). Rows that want logprobs are computed
        synchronously (their top-k needs the host)."""
        self._check_logits(logits, len(seq_ids))
        if not seq_ids:
            return PendingSample(no_samples)
        states, fast = self._rows(seq_ids)
        if fast or (all(s.unadjusted or s.only_grammar for s in states)
                    and all(s.params.logprobs is None for s in states)):
            constrained = [] if fast else [i for i, s in enumerate(states) if s.matcher is not None]
            drawn: list[tuple[Tensor, torch.cuda.Event | None]] = []

            def draw() -> None:
                if drawn:
                    return
                # The masks are made on the CPU while the GPU still runs the step that made the logits.
                x = self._mask_grammar(logits, states, constrained) if constrained else logits
                tokens = self._choose_unadjusted(x, states, fast)
                if tokens.device.type == "cuda":
                    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                    host.copy_(tokens, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                    drawn.append((host, done))
                else:
                    drawn.append((tokens, None))

            def finish() -> SampledTokens:
                draw()
                host, done = drawn[0]
                if done is not None:
                    done.synchronize()
                token_list = host.tolist()
                for state, token in zip(states, token_list):
                    state.output_ids.append(token)
                self._consume(states, token_list, constrained)
                return SampledTokens(seq_ids, token_list)

            if not constrained:
                draw()
            return PendingSample(finish, draw)
        result = self._sample_now(seq_ids, logits, states)
        return PendingSample(lambda: result)

    def _rows(self, seq_ids: list[int]) -> tuple[list[_SeqState], str]:
        """The rows' states and their common fast kind ("" when they differ), from the last step's
        when `seq_ids` is its list object (a list is never changed once a step has it; releasing a
        sequence forgets them)."""
        last = self._last_rows
        if last is not None and last[0] is seq_ids:
            return last[1], last[2]
        states = [self._state(s) for s in seq_ids]
        kinds = {s.fast_kind for s in states}
        fast = kinds.pop() if len(kinds) == 1 else ""
        self._last_rows = (seq_ids, states, fast)
        return states, fast

    def _consume(self, states: list[_SeqState], tokens: list[int], constrained: list[int]) -> None:
        """Hand the `constrained` rows' sampled tokens to the grammar thread, which advances their
        matchers and makes their next masks (the next step's, most likely)."""
        if not constrained:
            return
        assert self.grammars is not None
        self._drop_next_masks()
        matchers = [states[i].matcher for i in constrained]
        self._next_masks = matchers, self.grammars.advance_async(matchers, [tokens[i] for i in constrained],
                                                                 self.device.type == "cuda")

    def _drop_next_masks(self) -> None:
        """Forget the masks being made (after waiting for them: their matchers must not move meanwhile)."""
        if self._next_masks is not None:
            self.grammars.wait(self._next_masks[1])
            self._next_masks = None

    def _blocked(self, matchers: list) -> Tensor:
        """[rows, vocab] bool on the device: the tokens each matcher does NOT allow next. Rows whose
        masks `_consume` started are taken from there; the others are made now."""
        assert self.grammars is not None
        pinned = self.device.type == "cuda"
        made, self._next_masks = self._next_masks, None
        made_for, made_packed = (made[0], self.grammars.wait(made[1])) if made is not None else ([], None)
        if made_packed is not None:
            made_packed = made_packed.to(self.device, non_blocking=True)
            if len(made_for) == len(matchers) and all(a is b for a, b in zip(made_for, matchers)):
                return self.grammars.blocked(made_packed)         # exactly the rows made, in order: most steps
        index = {id(m): row for row, m in enumerate(made_for)}
        rows = [index.get(id(m)) for m in matchers]
        missing = [i for i, r in enumerate(rows) if r is None]
        fresh_packed = self.grammars.wait(self.grammars.masks_async([matchers[i] for i in missing], pinned)) \
            .to(self.device, non_blocking=True) if missing else None
        if len(missing) == len(matchers):
            return self.grammars.blocked(fresh_packed)
        have = [i for i, r in enumerate(rows) if r is not None]
        packed = torch.empty((len(matchers), made_packed.shape[1]), dtype=made_packed.dtype, device=self.device)
        packed[self._long(have)] = made_packed.index_select(0, self._long([rows[i] for i in have]))
        if missing:
            packed[self._long(missing)] = fresh_packed
        return self.grammars.blocked(packed)

    def _sample_now(self, seq_ids: list[int], logits: Tensor, states: list[_SeqState]) -> SampledTokens:
        if all(s.unadjusted for s in states):
            raw = None
            tokens = self._choose_unadjusted(logits, states)
        else:
            raw = logits.float()
            tokens = self._choose(self._adjust(raw, states), states)
        logprobs = self._token_logprobs(raw if raw is not None else logits.float(), tokens, states) \
            if any(s.params.logprobs is not None for s in states) else [None] * len(states)
        token_list = tokens.tolist()
        for state, token in zip(states, token_list):
            state.output_ids.append(token)
        self._consume(states, token_list, [i for i, s in enumerate(states) if s.matcher is not None])
        return SampledTokens(list(seq_ids), token_list,
                             logprobs if any(lp is not None for lp in logprobs) else None)

    def prompt_logprobs(self, logits: Tensor, targets: Tensor, k: int) -> list[TokenLogprob]:
        """Logprob of each row's target under log_softmax of the raw logits, plus the top k.

        logits: [rows, vocab] (float32, or cast to it); targets: [rows] long, the token that follows
        each position. No penalties, bias or temperature apply: this scores the prompt as the model sees it.
        """
        self._check_logits(logits, targets.shape[0])
        if logits.shape[0] == 0:
            return []
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen, top_values, top_ids = ops.logprobs_with_top(logprobs, targets.to(logits.device).long(), k)
        return _to_token_logprobs(targets.tolist(), chosen.tolist(), top_values.tolist(), top_ids.tolist())

    def _check_logits(self, logits: Tensor, rows: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != rows or logits.shape[1] != self.vocab_size:
            raise ValueError(f"expected logits of shape [{rows}, {self.vocab_size}], got {list(logits.shape)}")

    def _adjust(self, raw: Tensor, states: list[_SeqState]) -> Tensor:
        """Steps 1-3 of the module docstring on a copy of `raw` ([rows, vocab] float32)."""
        x = raw.clone()
        biased = [i for i, s in enumerate(states) if s.bias_ids is not None]
        if biased:
            rows = torch.cat([torch.full_like(states[i].bias_ids, i) for i in biased])
            ids = torch.cat([states[i].bias_ids for i in biased])
            values = torch.cat([states[i].bias_values for i in biased])
            x.index_put_((rows, ids), values, accumulate=True)
        penalized = [i for i, s in enumerate(states) if s.penalized]
        if penalized:
            x[penalized] = self._penalize(x[penalized], [states[i] for i in penalized])
        pending = [i for i, s in enumerate(states) if s.min_tokens_pending]
        if pending:
            rows_list = [i for i in pending for _ in states[i].blocked_ids]
            ids_list = [t for i in pending for t in states[i].blocked_ids]
            x[self._long(rows_list), self._long(ids_list)] = float("-inf")
        constrained = [i for i, s in enumerate(states) if s.matcher is not None]
        return self._mask_grammar(x, states, constrained, in_place=True) if constrained else x

    def _mask_grammar(self, x: Tensor, states: list[_SeqState], constrained: list[int],
                      in_place: bool = False) -> Tensor:
        """Step 3's grammar half: each row in `constrained` keeps only the tokens its matcher allows
        next (a copy of `x` unless `in_place`). Queues device work only, never waits for it."""
        blocked = self._blocked([states[i].matcher for i in constrained])
        # A matcher that allows nothing (an error state) lets the sequence end instead of drawing from -inf.
        alive = ~blocked.all(dim=-1)
        for eos in self.eos_token_ids:
            blocked[:, eos] &= alive
        if len(constrained) == x.shape[0]:
            return x.masked_fill_(blocked, float("-inf")) if in_place else x.masked_fill(blocked, float("-inf"))
        rows = self._long(constrained)
        x = x if in_place else x.clone()
        x[rows] = x[rows].masked_fill(blocked, float("-inf"))
        return x

    def _penalize(self, x: Tensor, states: list[_SeqState]) -> Tensor:
        rows, vocab = x.shape
        counts = torch.zeros((rows, vocab), dtype=torch.float32, device=x.device)
        out_rows = [r for r, s in enumerate(states) for _ in s.output_ids]
        if out_rows:
            out_ids = [t for s in states for t in s.output_ids]
            counts.index_put_((self._long(out_rows), self._long(out_ids)),
                              torch.ones(len(out_rows), device=x.device), accumulate=True)
        prompt_mask = torch.zeros((rows, vocab), dtype=torch.bool, device=x.device)
        with_prompt = [(r, s.prompt_ids) for r, s in enumerate(states) if s.prompt_ids is not None]
        if with_prompt:
            prompt_rows = torch.cat([torch.full_like(ids, r) for r, ids in with_prompt])
            prompt_mask[prompt_rows, torch.cat([ids for _, ids in with_prompt])] = True
        return ops.apply_penalties(
            x, counts, prompt_mask,
            self._float([s.params.presence_penalty for s in states]),
            self._float([s.params.frequency_penalty for s in states]),
            self._float([s.params.repetition_penalty for s in states]),
        )

    def _choose(self, x: Tensor, states: list[_SeqState]) -> Tensor:
        """[rows] long: argmax for greedy rows, a filtered random draw for the others."""
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            tokens[greedy] = torch.argmax(x[greedy], dim=-1)
        drawn = [i for i, s in enumerate(states) if not s.params.greedy]
        if drawn:
            drawn_states = [states[i] for i in drawn]
            probs = self._filtered_probs(x[drawn], [s.params for s in drawn_states])
            tokens[drawn] = self._draw_rows(probs, drawn_states)
        return tokens

    def _choose_unadjusted(self, logits: Tensor, states: list[_SeqState], fast_kind: str = "") -> Tensor:
        """`_choose` without the copies and row gathers when every row is greedy, or every row draws
        from the shared generator (the common batch cases; same tokens as `_choose`). `fast_kind`:
        every row's _SeqState.fast_kind, when they agree (skips the per-row checks)."""
        if fast_kind == "greedy" or (not fast_kind and all(s.params.greedy for s in states)):
            return torch.argmax(logits, dim=-1)       # bf16 -> float32 is exact: same argmax, same ties
        if fast_kind == "draw" or all(not s.params.greedy and s.stream is None for s in states):
            params = [s.params for s in states]
            if fast_kind == "draw" or not any(self._filtered(p) for p in params):
                temperatures = {p.temperature for p in params}
                inv_t = 1.0 / temperatures.pop() if len(temperatures) == 1 else \
                    self._float([1.0 / p.temperature for p in params])
                if self._draw is not None:
                    return self._draw(logits, inv_t, self._shared)
                scaled = logits.float() * (inv_t.unsqueeze(1) if isinstance(inv_t, Tensor) else inv_t)
                return self._draw_rows(torch.softmax(scaled, dim=-1), states)
            return self._draw_rows(self._filtered_probs(logits.float(), params), states)
        return self._choose(logits.float(), states)

    def _filtered(self, p: SamplingParams) -> bool:
        """Whether top_k, top_p or min_p removes anything (temperature alone does not)."""
        return 0 < p.top_k < self.vocab_size or p.top_p < 1.0 or p.min_p > 0.0

    def _filtered_probs(self, x: Tensor, params: list[SamplingParams]) -> Tensor:
        """Temperature, top_k, top_p, min_p on [rows, vocab]; returns the probabilities to draw from."""
        vocab = x.shape[1]
        x = x / self._float([p.temperature for p in params]).unsqueeze(1)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        if any(k < vocab for k in top_k) or any(p.top_p < 1.0 for p in params):
            x = ops.filter_top_k_top_p(x, self._long(top_k), self._float([p.top_p for p in params]))
        if any(p.min_p > 0.0 for p in params):
            x = ops.filter_min_p(x, self._float([p.min_p for p in params]))
        return torch.softmax(x, dim=-1)

    def _draw_rows(self, probs: Tensor, states: list[_SeqState]) -> Tensor:
        """[rows] long, a draw from each row of `probs` by inverse CDF, with one number per row: a
        seeded row's from its stream, the others' from the shared generator."""
        seeded = [i for i, s in enumerate(states) if s.stream is not None]
        if len(seeded) == len(states):
            return ops.draw_by_inverse_cdf(probs, self._float([s.next_uniform() for s in states]))
        numbers = torch.rand(len(states), generator=self._shared, device=self.device)
        if seeded:
            numbers[seeded] = self._float([states[i].next_uniform() for i in seeded])
        return ops.draw_by_inverse_cdf(probs, numbers)

    def _token_logprobs(self, raw: Tensor, tokens: Tensor, states: list[_SeqState]) -> list[TokenLogprob | None]:
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(states)
        if not wanted:
            return result
        k = max(states[i].params.logprobs or 0 for i in wanted)
        logprobs = torch.log_softmax(raw[wanted], dim=-1)
        chosen, top_values, top_ids = ops.logprobs_with_top(logprobs, tokens[wanted], k)
        rows = _to_token_logprobs(tokens[wanted].tolist(), chosen.tolist(), top_values.tolist(), top_ids.tolist())
        for i, row in zip(wanted, rows):
            own_k = states[i].params.logprobs or 0
            result[i] = TokenLogprob(row.token_id, row.logprob, row.top[:own_k])
        return result

    def _long(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _float(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)


def _to_token_logprobs(targets: list[int], chosen: list[float], top_values: list[list[float]],
                       top_ids: list[list[int]]) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=t, logprob=lp, top=tuple(zip(ids, values)))
            for t, lp, values, ids in zip(targets, chosen, top_values, top_ids)]
