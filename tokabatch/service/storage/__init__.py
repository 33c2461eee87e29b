"""Storage: SQLAlchemy 2 async models, the repository, blobs on disk."""
