"""Plain torch model definitions (Llama, Qwen2): no serving logic."""
