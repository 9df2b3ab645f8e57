"""Look inside a MonteCLoRA model: its Pyro graph and what its variational posterior learned.

- :func:`render_model`: ``pyro.render_model`` of the model (and guide) on a tiny batch when
  the ``graphviz`` package is installed, else the text of :func:`render_model_text`.
- :func:`model_relations`: the sites, plates and dependencies of that picture (no graphviz needed).
- :func:`render_model_text`: plates and sample sites of model and guide with their
  distributions and shapes, as plain text (no dependency).
- :func:`summary`: per layer group, the posterior of the mixture weights and of the covariance,
  the share of the adapter's norm due to the noise, and the extra parameters;
  :func:`format_summary` prints it as a table.

Example:
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> print(render_model_text(mc).splitlines()[0])
    MonteCLoRA model (classification): 2 layer groups, r = 4, N = 4 components, epsilon = 0.005
    >>> [(row["group"], row["layers"], row["extra_parameters"]) for row in summary(mc)]
    [('d16', 6, 48), ('d32', 1, 8)]
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pyro
import pyro.poutine as poutine
from pyro.contrib.autoname import scope
from pyro.infer.inspect import get_model_relations
from pyro.poutine.util import site_is_subsample
import torch

from .layers import StochasticLoraA
from .monteclora import device_of
from .models.prior import site_names
from .prediction.draws import draw_latents, seeded

__all__ = ["render_model", "render_model_text", "model_relations", "summary", "format_summary", "tiny_batch"]


def tiny_batch(monteclora: Any) -> dict[str, torch.Tensor]:
    """A one-example, two-token batch with labels, enough to trace the model."""
    device = device_of(monteclora)
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if monteclora.task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _traces(monteclora: Any, batch: Optional[dict], dataset_size: Optional[int]):
    batch = tiny_batch(monteclora) if batch is None else batch
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(monteclora.guide).get_trace(batch, dataset_size)
        model_trace = poutine.trace(poutine.replay(monteclora.model, trace=guide_trace)).get_trace(batch, dataset_size)
    return model_trace, guide_trace


def _describe(fn: Any) -> str:
    name = type(fn).__name__
    base = getattr(fn, "base_dist", None)
    if base is not None and name in ("MaskedDistribution", "Independent", "ExpandedDistribution"):
        return _describe(base)
    if name == "WishartCholesky":
        return f"WishartCholesky(df={float(fn.df.reshape(-1)[0]):g})"
    if name == "Dirichlet":
        return f"Dirichlet(concentration mean {float(fn.concentration.mean()):.3g})"
    return name


def _event_note(name: str, shape: tuple[int, ...], monteclora: Any) -> str:
    if name.endswith(".covariance_tril"):
        return "(r, r): Cholesky factor of a layer's covariance"
    if name.endswith(".weights"):
        return "(N,): mixture weights of the N components"
    if name.endswith(".components"):
        return "(d, r): one N(0, 1) per column, collapsed" if len(shape) == 2 else "(N, d, r): N components x d columns"
    return "tokens of a sequence" if monteclora.task == "causal_lm" else "class label"


def _site_lines(trace: poutine.Trace, monteclora: Any) -> list[str]:
    rows = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn = site["fn"]
        plates = ", ".join(f"{f.name}[{f.size}]" for f in site["cond_indep_stack"])
        observed = " observed" if site["is_observed"] else ""
        rows.append(
            (
                name,
                _describe(fn) + observed,
                f"batch {tuple(fn.batch_shape)} event {tuple(fn.event_shape)}",
                plates,
                _event_note(name, tuple(fn.event_shape), monteclora),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [
        f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  in {r[3] or '-'}; event = {r[4]}"
        for r in rows
    ]


def render_model_text(monteclora: Any, batch: Optional[dict] = None, dataset_size: Optional[int] = None) -> str:
    """The model's and the guide's plates and sample sites, with distributions and shapes.

    Traced on ``batch`` (default: :func:`tiny_batch`) with the guide's draws replayed into
    the model, exactly as one SVI step does.
    """
    model_trace, guide_trace = _traces(monteclora, batch, dataset_size)
    config = monteclora.monteclora_config
    groups = monteclora.groups
    lines = [
        f"MonteCLoRA model ({monteclora.task}): {len(groups)} layer groups, r = {config.lora_r}, "
        f"N = {config.num_components} components, epsilon = {config.sample_scaler:g}",
        "plates:",
    ]
    for g in groups:
        short = sorted({n.split(".")[-1] for n in g.module_names})
        lines.append(
            f"  {site_names(g)['plate']:<16} size {g.num_layers:<4} layers with d = {g.in_features} columns "
            f"of rank {g.rank} ({', '.join(short)})"
        )
    observed = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    for frame in observed[0]["cond_indep_stack"] if observed else ():
        full = getattr(frame, "full_size", None) or frame.size
        if dataset_size is None:
            lines.append(f"  {frame.name:<16} size {frame.size:<4} examples, unscaled (no dataset_size given: each counts once)")
        else:
            lines.append(f"  {frame.name:<16} size {full:<4} examples (a minibatch of {frame.size} is scaled by {full}/{frame.size})")
    lines.append("model sites (p):")
    lines += _site_lines(model_trace, monteclora)
    lines.append("guide sites (q):")
    lines += _site_lines(guide_trace, monteclora)
    lines.append(
        "noise on A per layer: epsilon * (sum_k pi_k xi_k @ L^T)^T, shape (r, d); A~ = A + noise, "
        "adapter update (alpha / r) * B @ A~"
    )
    return "\n".join(lines)


def _model_and_guide(monteclora: Any):
    """One program running the guide (sites renamed ``guide/<site>``) and then the model."""

    def model_and_guide(batch: dict, dataset_size: Optional[int] = None) -> torch.Tensor:
        scope(monteclora.guide, prefix="guide")(batch, dataset_size)
        return monteclora.model(batch, dataset_size)

    return model_and_guide


def model_relations(monteclora: Any, batch: Optional[dict] = None) -> dict:
    """``pyro.infer.inspect.get_model_relations`` of model + guide (guide sites ``guide/<site>``):
    the sites, their distributions, plates and dependencies that :func:`render_model` draws."""
    batch = tiny_batch(monteclora) if batch is None else batch
    with torch.no_grad():
        return get_model_relations(_model_and_guide(monteclora), model_args=(batch,))


def render_model(monteclora: Any, filename: Optional[str] = None, batch: Optional[dict] = None) -> Any:
    """A picture of model and guide when ``graphviz`` is importable, else :func:`render_model_text`.

    With graphviz: ``pyro.render_model`` of one program running the guide (its sites named
    ``guide/<site>``) and the model on a tiny batch, with distributions; a
    ``graphviz.Digraph``, also saved to ``filename`` when given (format from its extension).
    Without graphviz: the text, also written to ``filename`` when given.
    """
    try:
        import graphviz  # noqa: F401
    except ImportError:
        text = render_model_text(monteclora, batch)
        if filename is not None:
            with open(filename, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text
    batch = tiny_batch(monteclora) if batch is None else batch
    with torch.no_grad():
        return pyro.render_model(
            _model_and_guide(monteclora), model_args=(batch,), filename=filename, render_distributions=True
        )


@torch.no_grad()
def summary(monteclora: Any, num_samples: int = 16, seed: Optional[int] = 0) -> list[dict[str, Any]]:
    """One dict per layer group describing the variational posterior.

    Keys: ``group``, ``layers``, ``rank`` (r), ``columns`` (d), ``components`` (N);
    ``weights_mean`` ``(N,)`` (Dirichlet mean, averaged over the group's layers, sorted
    descending) and ``weights_total_concentration`` (``sum_k alpha_k``, averaged; the prior has
    ``N * alpha0``); ``scale_diag`` (guide's Wishart scale diagonal, averaged over layers and
    its r entries) and ``covariance_diag`` (``E[Sigma_ii] = df * v_i``, same average);
    ``noise_share`` (mean over layers of ``E||noise||_F / ||A||_F`` at the current epsilon, a
    Monte Carlo estimate from ``num_samples`` guide draws, seeded) and per layer in
    ``noise_share_per_layer``; ``extra_parameters`` (the guide's parameters, ``(r + N)`` per layer).
    """
    device = device_of(monteclora)
    with seeded(seed, device):
        noise = monteclora.model.noise(draw_latents(monteclora, num_samples))
    weights_of_a = {}
    for module in monteclora.network.modules():
        if isinstance(module, StochasticLoraA):
            weights_of_a[(id(module.noise_slot), module.noise_index)] = module.weight
    df = monteclora.monteclora_config.prior_wishart_df
    rows = []
    for g in monteclora.groups:
        posterior = monteclora.guide.posteriors[g.name]
        concentration = posterior.concentration.float()
        weights_mean = concentration / concentration.sum(-1, keepdim=True)
        scale = posterior.scale_diag.float()
        a_norms = torch.stack([weights_of_a[(id(g.slot), i)].float().norm() for i in range(g.num_layers)])
        noise_norms = noise[g.name].float().flatten(-2).norm(dim=-1).mean(0)  # (layers,)
        share = noise_norms / a_norms
        extra = sum(p.numel() for p in posterior.parameters())
        rows.append(
            {
                "group": g.name,
                "layers": g.num_layers,
                "rank": g.rank,
                "columns": g.in_features,
                "components": concentration.shape[-1],
                "weights_mean": weights_mean.mean(0).sort(descending=True).values.tolist(),
                "weights_total_concentration": float(concentration.sum(-1).mean()),
                "scale_diag": float(scale.mean()),
                "covariance_diag": float(df * scale.mean()),
                "noise_share": float(share.mean()),
                "noise_share_per_layer": share.tolist(),
                "extra_parameters": extra,
            }
        )
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A printable table of :func:`summary` rows, with the total of extra parameters."""
    header = f"{'group':<10}{'layers':>7}{'r':>4}{'d':>6}  {'E[pi] (sorted)':<28}{'sum alpha':>10}{'v':>9}{'E[S_ii]':>9}{'noise/|A|':>11}{'extra':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        weights = " ".join(f"{w:.2f}" for w in r["weights_mean"][:6]) + (" ..." if len(r["weights_mean"]) > 6 else "")
        lines.append(
            f"{r['group']:<10}{r['layers']:>7}{r['rank']:>4}{r['columns']:>6}  {weights:<28}"
            f"{r['weights_total_concentration']:>10.3g}{r['scale_diag']:>9.3g}{r['covariance_diag']:>9.3g}"
            f"{r['noise_share']:>11.2e}{r['extra_parameters']:>8}"
        )
    lines.append(f"total extra parameters: {sum(r['extra_parameters'] for r in rows)}")
    return "\n".join(lines)
