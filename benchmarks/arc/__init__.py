"""Issue #25's protocol: calibrated, robust fine-tuning of SmolLM2 on ARC-Easy (BLoB's protocol, on a CPU).

Run from the repository root: ``python -m benchmarks.arc --seeds 0 --jobs lora ours`` runs and saves
jobs, ``python -m benchmarks.arc --summarize`` writes ``benchmarks/results/arc.md``.

- :mod:`.data`: the protocol (model, budget, splits) and its rows;
- :mod:`.blob`: the BLoB-style baseline (a mean-field Gaussian on LoRA's A, flipout, KL reweighting);
- :mod:`.methods`: training and scoring of every method;
- :mod:`.jobs`: one saved, resumable job per (method, seed[, learning rate]);
- :mod:`.report`: the tables with 95% intervals over seeds, the figures, the targets.
"""
