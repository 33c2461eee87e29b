"""The batch service: aiohttp HTTP, SQLAlchemy storage, the job runner. Never imports torch."""
