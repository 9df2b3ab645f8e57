"""Issue #11's calibration protocol, run with ``python -m benchmarks.calibration`` from the repository root.

- :mod:`.protocol`: the command line and the per-suite summary (``python -m benchmarks.calibration``);
- :mod:`.methods`: suites, data, the methods' training and scoring;
- :mod:`.jobs`: one saved, resumable job per (suite, method, seed);
- :mod:`.report`: ``benchmarks/results/calibration.md`` and its figure;
- :mod:`.levers`, :mod:`.lr`, :mod:`.column_prior_mechanism`: the lever study, learning-rate
  robustness and the column-prior diagnosis (each ``python -m benchmarks.calibration.<name>``).
"""
