"""The inference engine: api (the seam), core (pure scheduling), models and runtime (torch)."""
