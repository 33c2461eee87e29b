"""Convert a GGUF file into a float32 HF folder (config.json + model.safetensors + tokenizer files).

Run as a child process by `tokabatch.model_store` (`python -m tokabatch.engine.runtime.gguf_import
GGUF OUTDIR`), so the service never imports torch or transformers. Uses transformers' own GGUF
loader (needs the `gguf` and `accelerate` packages), dequantizes to float32, and keeps the GGUF's
chat template in the saved tokenizer_config.json. Writes OUTDIR directly: the caller chooses a
temporary folder and renames it into place, which is what makes the conversion atomic.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Load `gguf_path` with transformers in float32 and save it as an HF folder in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _parse_once()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    # The weights are already dequantized; without this, save_pretrained would record a GGUF
    # quantization config that no loader (ours or transformers') can apply to safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.torch_dtype = torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _keep_chat_template(tokenizer, out_dir)


def _parse_once() -> None:
    """Make transformers' GGUF loader parse the file once, not three times.

    It opens a new `gguf.GGUFReader` for the config, the tokenizer and the weights, and each one
    walks every vocabulary string and merge (~440k fields for the demo model); and it builds gguf's
    `TensorNameMap` once per tensor (397 times). Both are pure functions of their arguments and
    transformers only reads what they return, so in this one-shot process they are memoised (the
    time saved: docs/benchmarks.md, "The demo model's first fetch"). transformers imports both from
    `gguf` at each call, which is what the patch relies on; were that to change, conversion would
    still be right, only slower."""
    import gguf

    gguf.GGUFReader = functools.lru_cache(maxsize=None)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def _keep_chat_template(tokenizer, out_dir: Path) -> None:
    """Make sure tokenizer_config.json carries the chat template (some versions write it elsewhere)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("chat_template") != template:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"error: no such GGUF file: {args.gguf}", file=sys.stderr)
        return 2
    convert(args.gguf, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
