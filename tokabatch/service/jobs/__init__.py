"""Batch jobs: states, parsing/validation, rendering, output writers, the runner."""
