"""Helpers for the jobs tests (parse/render/outputs/runner): a tiny real tokenizer folder built
offline with the `tokenizers` library (byte-level BPE + a ChatML template), so rendering runs
through tokabatch.text.Tokenizer exactly as in production without any model download."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokabatch.engine.api import ModelInfo
from tokabatch.text import Tokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Ünïcödé çharacters: àéîõü 中文 😀 and numbers 0123456789.",
] * 20


def build_tokenizer_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_tokenizer(tmp_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(build_tokenizer_folder(tmp_dir / "tiny-tokenizer"))


def model_info_for(tokenizer: Tokenizer, *, context_length: int = 256, model_id: str = "tiny") -> ModelInfo:
    return ModelInfo(model_id=model_id, context_length=context_length, vocab_size=tokenizer.vocab_size,
                     eos_token_ids=tokenizer.eos_token_ids)
