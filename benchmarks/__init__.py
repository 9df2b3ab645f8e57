"""Benchmarks of pyro_monteclora: run each from the repository root as ``python -m benchmarks.<name>``.

See ``benchmarks/README.md`` for what each measures and where its results go.
"""
