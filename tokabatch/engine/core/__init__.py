"""Pure scheduling and page accounting: stdlib only, never torch."""
