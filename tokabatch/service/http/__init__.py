"""HTTP handlers (aiohttp): files, batches, online completions, middleware."""
