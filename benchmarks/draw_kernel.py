"""The sampler's fused draws on one GPU: the inverse-CDF Triton draw (the engine's) and flashinfer's
(its fallback), each timed on [rows, vocab] bf16 logits and checked against the softmax.

On the GPU machine (after the wheel prelude of ../shared/gpu/README.md):

    python3 -m benchmarks.draw_kernel                          # Llama-3.2-1B's vocabulary
    python3 -m benchmarks.draw_kernel --vocab 151936 --rows 2048

For each draw: the largest gap between its token frequencies and the softmax over `--samples`
draws of one row (random logits scaled by 3, every fifth token masked to -inf; the count of masked
tokens drawn must be 0), at temperatures 0.5 and 1; then ms per call for each batch of rows
(CUDA events over `--iters` calls). Triton compiles the kernel on first use.
"""

from __future__ import annotations

import argparse


def draws() -> dict:
    from tokabatch.engine.runtime.flashinfer_kernels import draw_from_logits as flashinfer_draw
    from tokabatch.engine.runtime.triton_draw import draw_from_logits

    return {"inverse cdf (triton)": draw_from_logits, "flashinfer": flashinfer_draw}


def check_frequencies(vocab: int, samples: int) -> None:
    import torch

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    row = (torch.randn(vocab, device=dev, generator=gen) * 3).to(torch.bfloat16)
    row[::5] = float("-inf")
    for temperature in (0.5, 1.0):
        want = torch.softmax(row.float() / temperature, -1)
        for name, draw in draws().items():
            tokens = draw(row.expand(samples, vocab), 1 / temperature, gen).long()
            freq = torch.bincount(tokens, minlength=vocab).double() / samples
            print(f"T={temperature} {name}: max |frequency - p| {(freq - want).abs().max().item():.5f} "
                  f"(largest p {want.max().item():.4f}), masked tokens drawn {int(freq[::5].gt(0).sum())}")


def time_draws(vocab: int, rows: list[int], iters: int) -> None:
    import torch

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    print("| rows | " + " | ".join(f"{name} ms" for name in draws()) + " |")
    print("|---" * (len(draws()) + 1) + "|")
    for n in rows:
        logits = torch.randn(n, vocab, device=dev).to(torch.bfloat16)
        times = []
        for draw in draws().values():
            for _ in range(3):
                draw(logits, 1.0, gen)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                draw(logits, 1.0, gen)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters)
        print(f"| {n} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", default="1024,2048,4096", help="comma-separated batch sizes to time")
    ap.add_argument("--samples", type=int, default=20_000, help="draws per frequency check")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    check_frequencies(args.vocab, args.samples)
    time_draws(args.vocab, [int(r) for r in args.rows.split(",")], args.iters)


if __name__ == "__main__":
    main()
