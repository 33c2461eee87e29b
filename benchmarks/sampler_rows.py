"""The sampler's time per step by kind of row: `Sampler.sample` on [rows, vocab] logits, each kind
of row alone (shared-generator draws, top_p-filtered draws, seeded draws, greedy), on any device.

    .venv/bin/python -m benchmarks.sampler_rows                        # the demo model's vocabulary, CPU
    python3 -m benchmarks.sampler_rows --device cuda --vocab 128256 --rows 1024

Each kind: `--steps` steps of `--rows` registered rows (random float32 logits, scaled by 3), after
one untimed step; prints ms per step (median, and the fastest) and the tokens per second of the
sampler alone. On CUDA each step ends with the tokens on the host, as the engine's do.
"""

from __future__ import annotations

import argparse
import statistics
import time

KINDS = {
    "shared": {"temperature": 0.7},
    "top_p": {"temperature": 0.7, "top_p": 0.9},
    "seeded": {"temperature": 0.7, "seed": 0},
    "greedy": {"temperature": 0.0},
}


def time_kind(kind: str, rows: int, vocab: int, steps: int, device: str) -> list[float]:
    import torch

    from tokabatch.engine.api import SamplingParams
    from tokabatch.engine.runtime.sampling import Sampler

    sampler = Sampler(vocab, device, (0,), seed=1)
    fields = KINDS[kind]
    for seq in range(rows):
        params = SamplingParams(**{**fields, "seed": seq} if "seed" in fields else fields)
        sampler.register(seq, params, [])
    seq_ids = list(range(rows))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul_(3).to(device)
    sampler.sample(seq_ids, logits)                  # untimed: first-use allocations
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sampler.sample(seq_ids, logits)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=140)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = parser.parse_args()
    print(f"{args.rows} rows x {args.vocab} tokens on {args.device}, {args.steps} steps each")
    for kind in args.kinds:
        times = time_kind(kind, args.rows, args.vocab, args.steps, args.device)
        median = statistics.median(times)
        print(f"{kind:<8} median {median:8.2f} ms/step  fastest {min(times):8.2f}  "
              f"({args.rows / median * 1000:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
