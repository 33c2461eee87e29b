"""Admission by simulating future KV-page use: would these waiting sequences ever overflow the pool?

Owns the page-use forecast (one curve per sequence plus shared prefix pages) and the fast peak
computation. Pure stdlib: must not import torch.

The model. Step t = 0 is the step being planned. A sequence with g KV positions after step 0
(all of its tokens if it is prefilling; when that prefill ends is bounded below) holds
ceil((g + t) / page_size) pages after step t, one more position per step, until its last step e
(its predicted final length L* means e = L* - 1 - g: the last sampled token never runs).
After e its pages are released (published full pages become cached, i.e. reusable).
A prefilling sequence completes its prefill at some step c, unknown but bounded: at the earliest
c_min = ceil(backlog / max_tokens_per_step) - 1 (the backlog is the prefill tokens ahead of it plus
its own; FIFO), at the latest c_max = ceil(backlog / min_budget) - 1 where min_budget is the
smallest prefill budget a step can have (max_tokens_per_step minus max_seqs - 1 decodes). Its
curve is the envelope of all those cases: flat at ceil(g / ps) until c_min, rising after, and
alive until c_max + L* - 1 - g. (Rising from c_min but ending at c_max over-counts its last page
by up to c_max - c_min tokens; flat until c_max would under-count when the prefill finishes early.)
Shared prefix pages (refcount > 1, or a waiting sequence's prefix-cache hit) are not part of any
one sequence's curve: each counts 1 until the last step of its last holder. So

    use(t) = sum over sequences with e >= t of (ceil((g + t) / ps) - s)  +  #{shared pages with end >= t}

where s is how many of the sequence's pages are counted as shared. Between two "last step" events
use(t) only rises, so its maximum is reached at one of those events: one point per finish event.
With exact length predictions the model never under-counts (a seeded test checks that nothing is
then ever preempted); with guesses, a wrong one is repaired by preemption in the scheduler.

Evaluating a point fast: write g = q*ps + f (f in [0, ps)) and t = a*ps + b. Then
ceil((g + t)/ps) = q + a + ceil((f + b)/ps), and ceil((f + b)/ps) is 0 if f + b == 0, 2 if
f + b > ps, else 1. So the sweep keeps, over the sequences still alive, their count n, the sum of
(q - s) and a histogram of f (the last-page fill) -- nothing per step. A delayed curve is the
undelayed curve of g - c (q may be negative: the identity still holds) plus its flat top, which is
a decreasing staircase and so a sum of unit constants, each alive until the step where the
rising part has caught up one more page.

Worked example, page_size 4, budget 6 pages, two running sequences and one shared page:
  A: g=5, e=2, s=1     pages after step t: ceil((5+t)/4) - 1 = 1, 1, 1   (t = 0, 1, 2)
  B: g=3, e=6, s=0     pages: ceil((3+t)/4) = 1, 1, 2, 2, 2, 2, 3       (t = 0 .. 6)
  shared page P (held by A and B): end = max(2, 6) = 6
  Events t = 6: alive {B}, shared 1 -> 3 + 1 = 4;  t = 2: alive {A, B}, shared 1 -> 1 + 2 + 1 = 4.
  Peak 4 <= 6. A candidate C with g=6, e=5, s=0 (ceil((6+t)/4) = 2, 2, 2, 3, 3, 3):
  t = 6: 4 (C gone);  t = 5: B 2 + C 3 + P 1 = 6;  t = 2: A 1 + B 2 + C 2 + P 1 = 6.  Peak 6: admit.
  With sweep arithmetic at t = 5 (a=1, b=1): B has q=0, f=3 -> 0 + 1 + ceil(4/4)=1 -> 2;
  C has q=1, f=2 -> 1 + 1 + ceil(3/4)=1 -> 3. Same numbers, no per-step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from tokabatch.engine.core.pages import PagePool
from tokabatch.engine.core.request import Sequence


@dataclass(slots=True)
class Curve:
    num_positions: int        # g: KV positions held once its prefill is done
    last_step: int            # e: the last step during which it holds pages (>= 0)
    num_shared_pages: int     # s: of its pages, how many are counted in the shared table instead
    delay: int = 0            # c: steps until its prefill completes (its curve is flat until then)

    def pages_at(self, t: int, page_size: int) -> int:
        """Pages it holds during step t (exact model; 0 after its last step)."""
        if t > self.last_step:
            return 0
        return -(-(self.num_positions + max(0, t - self.delay)) // page_size) - self.num_shared_pages


def _undelay(curve: Curve, page_size: int, ends: list[int]) -> Curve:
    """The rising part of a delayed curve; appends its flat top as unit constants' end steps to `ends`.

    Flat top D(t) = ceil(g/ps) - ceil((g - c + t)/ps) for t < c. D(t) >= j exactly while
    t <= (ceil(g/ps) - j)*ps - g + c, so unit j ends at min(c - 1, that).
    Example: g=5, c=3, ps=2: rising part ceil((2+t)/2) = 1, 2, 2 for t = 0, 1, 2; D = 2, 1, 1;
    unit 1 ends at min(2, (3-1)*2 - 5 + 3 = 2) = 2, unit 2 at min(2, 0) = 0: 3, 3, 3 as the flat top.
    """
    g, c, ps = curve.num_positions, curve.delay, page_size
    top = -(-g // ps)
    for j in range(1, top - (-(-(g - c) // ps)) + 1):
        ends.append(min(c - 1, (top - j) * ps - g + c))
    return Curve(g - c, curve.last_step, curve.num_shared_pages)


def peak_page_use(curves: Iterable[Curve], shared_ends: Iterable[int], page_size: int) -> int:
    """max over t >= 0 of use(t) (see the module docstring), by a sweep over finish events."""
    ps = page_size
    ends = list(shared_ends)
    ordered = sorted((_undelay(c, ps, ends) if c.delay > 0 else c for c in curves),
                     key=lambda c: c.last_step, reverse=True)
    ends.sort(reverse=True)
    events = sorted({c.last_step for c in ordered} | set(ends), reverse=True)
    hist = [0] * ps
    num_alive = 0
    sum_q = 0
    num_shared = 0
    i = j = 0
    peak = 0
    for t in events:
        while i < len(ordered) and ordered[i].last_step >= t:
            c = ordered[i]
            q, f = divmod(c.num_positions, ps)
            sum_q += q - c.num_shared_pages
            hist[f] += 1
            num_alive += 1
            i += 1
        while j < len(ends) and ends[j] >= t:
            num_shared += 1
            j += 1
        a, b = divmod(t, ps)
        use = sum_q + num_alive * a + num_alive + num_shared
        if b == 0:
            use -= hist[0]                              # f + b == 0: no extra page
        else:
            use += sum(hist[ps - b + 1:])               # f + b > ps: a second extra page
        peak = max(peak, use)
    return peak


def brute_force_peak(curves: Iterable[Curve], shared_ends: Iterable[int], page_size: int) -> int:
    """The same quantity step by step (slow; the reference for tests)."""
    curves = list(curves)
    ends = list(shared_ends)
    horizon = max([c.last_step for c in curves] + ends + [0])
    peak = 0
    for t in range(horizon + 1):
        use = sum(c.pages_at(t, page_size) for c in curves) + sum(1 for e in ends if e >= t)
        peak = max(peak, use)
    return peak


@dataclass(slots=True)
class Forecast:
    """The running sequences' curves and shared pages; candidates are tried on top of it."""

    page_size: int
    min_prefill_budget: int                   # the fewest prefill tokens a step with a prefill runs
    max_prefill_budget: int                   # the most (max_tokens_per_step)
    curves: list[Curve] = field(default_factory=list)
    shared: dict[int, int] = field(default_factory=dict)    # page -> last step of its last holder
    prefill_backlog: int = 0                  # prefill tokens queued ahead of a new sequence
    owner_of: dict[int, int] | None = None    # page -> curve index, for pages held by exactly one sequence
    running: list[Sequence] = field(default_factory=list)

    def curve(self, num_positions: int, predicted_len: int, backlog: int, num_shared: int) -> Curve:
        """The curve of a sequence with g positions ending at predicted_len tokens, whose prefill
        completes once `backlog` prefill tokens (its own included; 0 if decoding) have run."""
        earliest = max(0, -(-backlog // self.max_prefill_budget) - 1)
        latest = max(0, -(-backlog // self.min_prefill_budget) - 1)
        return Curve(num_positions, latest + max(0, predicted_len - 1 - num_positions), num_shared, earliest)

    def peak(self) -> int:
        return peak_page_use(self.curves, self.shared.values(), self.page_size)


def build_forecast(running: Iterable[Sequence], pool: PagePool, predicted_len: Callable[[Sequence], int],
                   min_prefill_budget: int, max_prefill_budget: int) -> Forecast:
    """Curves for the running sequences, in admission order (which is also prefill order)."""
    fc = Forecast(page_size=pool.page_size, min_prefill_budget=max(1, min_prefill_budget),
                  max_prefill_budget=max(1, max_prefill_budget))
    for seq in running:
        g = seq.num_tokens
        # A decode that already has its page runs every step; anything else waits in the FIFO
        # prefill queue (including a just-admitted sequence with only its last token to run).
        decoding = seq.is_decoding and len(seq.page_ids) * fc.page_size >= g
        remaining = 0 if decoding else g - seq.num_computed
        fc.prefill_backlog += remaining
        # Refcounts never rise along a page table and shared pages are in the tree (published),
        # so the shared pages are a prefix of the published ones: binary search its end.
        lo, hi = 0, seq.num_published_pages
        if hi and pool.refcount(seq.page_ids[0]) == 1:
            hi = 0                            # its first page is its own: so is every later one
        while lo < hi:
            mid = (lo + hi) // 2
            if pool.refcount(seq.page_ids[mid]) > 1:
                lo = mid + 1
            else:
                hi = mid
        fc.curves.append(fc.curve(g, predicted_len(seq), fc.prefill_backlog if remaining else 0, lo))
        fc.running.append(seq)
    # A shared page lives until its last holder's last step. Visit holders latest-first: the first
    # visitor of a page sets its end. Every holder of a page also holds the pages before it, so the
    # pages already set form a prefix of each table: walk back from the end and stop at the first.
    for idx in sorted(range(len(fc.curves)), key=lambda i: fc.curves[i].last_step, reverse=True):
        curve, pages = fc.curves[idx], fc.running[idx].page_ids
        for k in range(curve.num_shared_pages - 1, -1, -1):
            if pages[k] in fc.shared:
                break
            fc.shared[pages[k]] = curve.last_step
    return fc


def fits_with(fc: Forecast, pool: PagePool, candidates: list[tuple[Sequence, list[int]]],
              predicted_len: Callable[[Sequence], int]) -> tuple[bool, int]:
    """Would admitting `candidates` (each with its prefix-cache hit pages) keep use(t) <= num_pages?

    Returns (fits, peak). Works on copies; `fc` is unchanged.
    """
    curves = [Curve(c.num_positions, c.last_step, c.num_shared_pages, c.delay) for c in fc.curves]
    shared = dict(fc.shared)
    backlog = fc.prefill_backlog
    for seq, hit_pages in candidates:
        g = seq.num_tokens
        remaining = max(1, g - len(hit_pages) * fc.page_size)   # a whole-sequence hit still runs its last token
        backlog += remaining
        curve = fc.curve(g, predicted_len(seq), backlog, len(hit_pages))
        e = curve.last_step
        for page in hit_pages:                # (one pass per page: thousands of candidates share them)
            end = shared.get(page)
            if end is None:
                end = 0
                if pool.refcount(page) == 1:
                    # Held by one running sequence as its own page: move it out of that curve into the
                    # shared table, so it is counted once, until the later of the two finishes.
                    idx = _owners(fc, pool)[page]
                    curves[idx].num_shared_pages += 1
                    end = fc.curves[idx].last_step
            if e > end:
                end = e
            shared[page] = end
        curves.append(curve)
    peak = peak_page_use(curves, shared.values(), fc.page_size)
    return peak <= pool.num_pages, peak


def _owners(fc: Forecast, pool: PagePool) -> dict[int, int]:
    """page -> index of the only running sequence holding it (built once, only when needed)."""
    if fc.owner_of is None:
        fc.owner_of = {}
        for idx, seq in enumerate(fc.running):
            for page in seq.page_ids[:seq.num_published_pages]:
                if pool.refcount(page) == 1:
                    fc.owner_of[page] = idx
    return fc.owner_of


__all__ = ["Curve", "Forecast", "brute_force_peak", "build_forecast", "fits_with", "peak_page_use"]
