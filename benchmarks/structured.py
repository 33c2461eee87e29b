"""What a JSON schema costs per output token: the engine in-process, constrained, then unconstrained on
the same output lengths. `--masks-only` times llguidance alone: rows of matchers walk the schema by
random allowed tokens, and each step's advance and masks are made on N threads (what the engine's
grammar thread costs per row, without the engine).

    python -m benchmarks.structured                          # CPU: the demo model, 64 prompts
    python -m benchmarks.structured --model FOLDER --prompts 1024 --max-tokens 256
    python3 scripts/bench.py --workload JSON --tokenizer-from FOLDER   # the GPU: a random Llama-3.2-1B
    python -m benchmarks.structured --masks-only --tokenizer-from FOLDER --threads 1,4,12 [--fresh] [--busy]

The constrained run gives every prompt the same 8-field schema (docs/structured-outputs.md) and
records each sequence's output length; the unconstrained run then asks each prompt for exactly
that many tokens (ignore_eos), so both runs generate the same tokens per sequence and the ratio of
their seconds per output token is the constraint's cost. The model folder needs a byte-level
tokenizer (JSON punctuation must be tokens): a random-weight folder (random_models.build_folder)
takes one with `--tokenizer-from` a real model's folder.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from tokabatch.config import load_config
from tokabatch.engine.api import (
    ChoiceOutput,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    Priority,
    SamplingParams,
)
from tokabatch.engine.runtime.factory import build_loop
from tokabatch.engine.runtime.grammar import Grammars
from tokabatch.service.jobs.structured import json_schema_grammar
from tokabatch.text import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0}, "name": {"type": "string", "maxLength": 24},
    "email": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "score": {"type": "number", "minimum": 0, "maximum": 1}, "tier": {"enum": ["free", "pro", "team"]},
    "active": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                            "maxItems": 4}},
    "required": ["id", "name", "email", "age", "score", "tier", "active", "tags"], "additionalProperties": False}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def adopt_tokenizer(model: Path, source: Path) -> None:
    """Give a random-weight folder `source`'s tokenizer, and its EOS ids in config.json and
    generation_config.json (the engine reads EOS from there; the grammar needs it in the vocabulary)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, model / name)
    eos = list(Tokenizer.from_folder(source).eos_token_ids)
    for name in ("config.json", "generation_config.json"):
        path = model / name
        config = json.loads(path.read_text()) if path.is_file() else {}
        config["eos_token_id"] = eos
        path.write_text(json.dumps(config, indent=2))


COUNTERS = ("mask_calls", "mask_rows", "mask_seconds", "wait_seconds")


def mask_report(grammars: Grammars, before: tuple) -> dict:
    """The masks of one run from the Grammars counters (`before`: their COUNTERS at its start):
    seconds on the grammar thread advancing the matchers and making their masks, per step and rows
    per step, and the seconds the engine thread waited for them (the part the GPU step did not hide)."""
    steps, rows, seconds, waited = (getattr(grammars, name) - b for name, b in zip(COUNTERS, before))
    return {"mask_s": round(seconds, 3), "mask_steps": steps,
            "mask_ms_per_step": round(1e3 * seconds / max(1, steps), 3),
            "mask_rows_per_step": round(rows / max(1, steps), 1), "mask_waited_s": round(waited, 3)}


def run(loop, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[ChoiceOutput]]:
    """Seconds to finish every prompt, and each one's choice."""
    began = time.perf_counter()
    for i, (ids, p) in enumerate(zip(prompts, params)):
        loop.add(GenerationRequest(f"r{i}", tuple(ids), p, priority=Priority.BATCH))
    choices: list[ChoiceOutput | None] = [None] * len(prompts)
    done = 0
    while done < len(prompts):
        for item in loop.step():
            if isinstance(item, GenerationOutput):
                assert item.ok, item.error
                choices[int(item.request_id[1:])] = item.choices[0]
                done += 1
    return time.perf_counter() - began, choices


def valid_outputs(choices: list[ChoiceOutput]) -> dict:
    """How many ended with `stop`, and how many of those parse and validate against SCHEMA."""
    import jsonschema  # noqa: PLC0415 (a service dependency, not the engine's)

    stopped = [c for c in choices if c.finish_reason == FinishReason.STOP]
    valid = 0
    for c in stopped:
        try:
            jsonschema.validate(json.loads(c.text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"stopped": len(stopped), "stopped_valid": valid}


def measure(model: str, prompts: int, max_tokens: int, prompt_len: int = 128) -> dict:
    """The constrained run, then the unconstrained one on the same output lengths, on one engine loop."""
    loop = build_loop(load_config(env={}, model={"path": model}).engine)
    rng = random.Random(0)
    vocab = min(loop.info.vocab_size, 32_000)
    # Each run has prompts of its own: the prefix cache must not serve the second run's prefills.
    warm_up, constrained_prompts, free_prompts = ([[rng.randrange(100, vocab) for _ in range(prompt_len)]
                                                   for _ in range(count)] for count in (2, prompts, prompts))
    grammar = json_schema_grammar(SCHEMA)
    constrained = [SamplingParams(max_tokens=max_tokens, temperature=1.0, grammar=grammar)] * prompts
    run(loop, warm_up, constrained[:2])                                       # the grammar tokenizer is built
    grammars = loop.runner.sampler.grammars                                   # one for both halves
    before = tuple(getattr(grammars, name) for name in COUNTERS)
    seconds_c, choices = run(loop, constrained_prompts, constrained)
    masks = mask_report(grammars, before)
    lengths = [len(c.token_ids) for c in choices]
    free = [SamplingParams(max_tokens=max(1, n), temperature=1.0, ignore_eos=True) for n in lengths]
    seconds_u, free_choices = run(loop, free_prompts, free)
    lengths_u = [len(c.token_ids) for c in free_choices]
    tokens = sum(lengths)
    assert sum(lengths_u) == sum(max(1, n) for n in lengths)
    per_c, per_u = seconds_c / tokens, seconds_u / sum(lengths_u)
    return {"prompts": prompts, "output_tokens": tokens, "constrained_s": round(seconds_c, 2),
            "unconstrained_s": round(seconds_u, 2), "ratio_per_token": round(per_c / per_u, 3),
            "constrained_tok_s": round(tokens / seconds_c), "unconstrained_tok_s": round(sum(lengths_u) / seconds_u),
            **valid_outputs(choices), **masks, "device": loop.info.device}


def mask_scaling(tokenizer: Path, threads: list[int], rows: int, steps: int, vocab_size: int,
                 fresh: bool = False, busy: bool = False) -> list[dict]:
    """Microseconds per row of a step's grammar work, done as the engine does it
    (Grammars.advance_async: each row consumes its token, then makes its next mask) on each thread
    count: `rows` matchers of SCHEMA walk `steps` steps, each by a random allowed token (the same
    walk for every thread count). `fresh` builds every matcher from the grammar text instead of
    copying a first one (Grammars.matcher); `busy` runs a Python thread beside the walk, as the
    engine thread runs Python while the masks are made (docs/benchmarks.md, "The GIL")."""
    import threading  # noqa: PLC0415

    import llguidance  # noqa: PLC0415 (the engine's dependency)
    import numpy as np  # noqa: PLC0415

    tokenizer_json = (tokenizer / "tokenizer.json").read_text()
    grammar = json_schema_grammar(SCHEMA)
    results = []
    for count in threads:
        grammars = Grammars(tokenizer_json, vocab_size, Tokenizer.from_folder(tokenizer).eos_token_ids, threads=count)
        live = [llguidance.LLMatcher(grammars._tokenizer(), grammar, log_level=0) if fresh
                else grammars.matcher(grammar) for _ in range(rows)]
        packed = grammars.wait(grammars.masks_async(live, pinned=False)).numpy()
        rng = np.random.default_rng(0)
        stop = threading.Event()
        spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
        if busy:
            spinner.start()
        seconds, done = 0.0, 0
        for _ in range(steps):
            allowed = (np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size])
                       for bits in packed)
            tokens = [int(rng.choice(ids)) for ids in allowed]
            began = time.perf_counter()
            packed = grammars.wait(grammars.advance_async(live, tokens, pinned=False)).numpy()
            seconds += time.perf_counter() - began
            done += len(live)
            keep = [i for i, m in enumerate(live) if not m.is_stopped()]
            if not keep:
                break
            live, packed = [live[i] for i in keep], packed[keep]
        stop.set()
        results.append({"threads": count, "rows": rows, "rows_done": done, "fresh": fresh, "busy": busy,
                        "us_per_row": round(1e6 * seconds / max(1, done), 1)})
    return results


def _spin(stop) -> None:
    """Python work until `stop` is set (holds the GIL as an engine thread between its waits)."""
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokenizer-from", type=Path, help="copy this folder's tokenizer into --model first")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--masks-only", action="store_true", help="time llguidance's masks alone (--tokenizer-from)")
    parser.add_argument("--threads", default="1,4,12", help="--masks-only: thread counts, comma-separated")
    parser.add_argument("--rows", type=int, default=384, help="--masks-only: matchers per step")
    parser.add_argument("--steps", type=int, default=40, help="--masks-only: steps of the walk")
    parser.add_argument("--vocab-size", type=int, default=128_256, help="--masks-only: the model's vocabulary")
    parser.add_argument("--fresh", action="store_true", help="--masks-only: a matcher per row from the text")
    parser.add_argument("--busy", action="store_true", help="--masks-only: a Python thread spins beside the masks")
    args = parser.parse_args()
    if args.masks_only:
        if args.tokenizer_from is None:
            raise SystemExit("--masks-only needs --tokenizer-from: a byte-level tokenizer's folder")
        for row in mask_scaling(args.tokenizer_from, [int(t) for t in args.threads.split(",")], args.rows,
                                args.steps, args.vocab_size, args.fresh, args.busy):
            print(json.dumps(row))
        return
    if args.tokenizer_from is not None:
        adopt_tokenizer(Path(args.model), args.tokenizer_from)
    print(json.dumps(measure(args.model, args.prompts, args.max_tokens, args.prompt_len)))


if __name__ == "__main__":
    main()
