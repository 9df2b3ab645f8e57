"""What the column prior does to the adapter (VADER suite, seed 0): the size of A and B, and of the noise relative to A.

Run from the repository root: ``python -m benchmarks.calibration.column_prior_mechanism`` (~3 min on 2 cores).
Trains the ``vader`` suite of ``calibration/`` with the paper's settings and with
``column_prior=True, kl_weight=0.1`` (the ``ours_column`` method), and writes
``benchmarks/results/column_prior_mechanism.json``: the RMS of the A and B entries, the ratio of
the expected noise RMS per entry (``eps^2 E||pi||^2 E[Sigma_ii]`` under the guide) to A's RMS per
layer (median, min, max over layers) and the last step's KL per example.
"""

from __future__ import annotations

import datetime
import json
import os

import torch

from .methods import SUITES, load_suite_data, train_ours


def sizes(result) -> dict:
    """RMS of A and B, and the guide's expected noise RMS per entry relative to A's, per layer."""
    mc = result.model
    a = torch.cat([m.weight.detach().reshape(-1) for ms in mc.model.lora_a_modules.values() for m in ms])
    b = torch.cat([p.detach().reshape(-1) for n, p in mc.network.named_parameters() if "lora_B" in n])
    eps = mc.monteclora_config.sample_scaler
    means = mc.model.lora_a()
    ratios = []
    for group, posterior in mc.guide.posteriors.items():
        concentration = posterior.concentration.detach()
        total = concentration.sum(-1, keepdim=True)
        pi_squared = (concentration * (concentration + 1) / (total * (total + 1))).sum(-1)  # E sum_k pi_k^2
        sigma_ii = posterior.df * posterior.scale_diag.detach().mean(-1)  # E Sigma_ii of Wishart(df, diag(v))
        noise = eps**2 * pi_squared * sigma_ii
        ratios.append((noise / means[group].detach().pow(2).mean((-1, -2))).sqrt())
    ratio = torch.cat(ratios)
    return dict(a_rms=float(a.pow(2).mean().sqrt()), b_rms=float(b.pow(2).mean().sqrt()),
                noise_to_a_rms_median=float(ratio.median()), noise_to_a_rms_min=float(ratio.min()),
                noise_to_a_rms_max=float(ratio.max()), kl=result.history[-1]["kl"])


def main() -> dict:
    torch.set_num_threads(2)
    suite = SUITES["vader"]
    data = load_suite_data(suite)
    out: dict = {}
    for name, overrides in (("paper", {}), ("column_0.1", dict(column_prior=True, kl_weight=0.1))):
        out[name] = sizes(train_ours(suite, data["train"], 0, [], **overrides))
        print(name, out[name], flush=True)
    out.update(command="python -m benchmarks.calibration.column_prior_mechanism", date=str(datetime.date.today()))
    with open(os.path.join("benchmarks", "results", "column_prior_mechanism.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=1)
    return out


if __name__ == "__main__":
    main()
