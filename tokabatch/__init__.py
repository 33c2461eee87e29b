"""tokabatch: an asynchronous, durable, OpenAI-compatible LLM batch-job service.

Importing the package imports nothing heavy (no torch, no aiohttp): the CLI, the service and the
engine each import what they need.
"""

__version__ = "0.1.0"
