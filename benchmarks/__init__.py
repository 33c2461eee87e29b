"""Development harnesses: the engine's bookkeeping and scheduling measured on a CPU without a model
(step_overhead, ordering, admission) and one GPU kernel comparison (decode_kernel).

Run from the repository root as modules, e.g. `.venv/bin/python -m benchmarks.step_overhead`; the
tools a user or maintainer runs (scripts/bench.py, scripts/bench_cpu.py) stay in scripts/.
"""
