"""Model rendering and the posterior summary."""

from __future__ import annotations

import importlib.util

import pyro.poutine as poutine
import pytest
import torch

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.inspection import format_summary, model_relations, render_model, render_model_text, summary, tiny_batch
from pyro_monteclora.testing import tiny_bert, tiny_llama


@pytest.fixture(params=["bert", "llama"])
def monteclora(request):
    model = tiny_bert() if request.param == "bert" else tiny_llama()
    return MonteCLoRA.from_model(model, lora_r=4, num_components=3)


def test_text_rendering_names_every_site_and_plate(monteclora):
    text = render_model_text(monteclora, dataset_size=50)
    trace = poutine.trace(monteclora.model).get_trace(tiny_batch(monteclora), 50)
    sample_sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert "obs" in sample_sites
    for name in sample_sites:
        assert name in text
    for group in monteclora.groups:
        assert f"{group.name}.layers       size {group.num_layers}" in text
    assert "size 50" in text and "WishartCholesky" in text and "Dirichlet" in text
    assert "guide sites (q):" in text


def test_model_relations_of_model_and_guide(monteclora):
    relations = model_relations(monteclora)
    latent = [n for n in relations["sample_dist"] if n != "obs" and not n.startswith("guide/")]
    assert len(latent) == 3 * len(monteclora.groups)
    assert sorted(relations["sample_sample"]["obs"]) == sorted(latent)  # the data depend on every latent
    for name in latent:
        assert relations["sample_dist"]["guide/" + name] == relations["sample_dist"][name]
    assert relations["observed"] == ["obs"] and "data" in relations["plate_sample"]


@pytest.mark.skipif(importlib.util.find_spec("graphviz") is not None, reason="graphviz installed: a picture is drawn")
def test_render_model_falls_back_to_text(monteclora, tmp_path):
    path = tmp_path / "model.txt"
    text = render_model(monteclora, filename=str(path))
    assert isinstance(text, str) and path.read_text().strip() == text.strip()


def test_summary_counts_r_plus_n_per_layer(monteclora):
    rows = summary(monteclora, num_samples=4)
    for row, group in zip(rows, monteclora.groups):
        assert row["extra_parameters"] == (4 + 3) * group.num_layers
        assert row["weights_mean"] == pytest.approx([1 / 3] * 3)  # the guide starts at the prior
        assert row["covariance_diag"] == pytest.approx(4.0)  # df = r, scale 1
        assert len(row["noise_share_per_layer"]) == group.num_layers
    assert sum(r["extra_parameters"] for r in rows) == monteclora.num_extra_parameters()
    table = format_summary(rows)
    assert all(g.name in table for g in monteclora.groups)
    assert f"total extra parameters: {monteclora.num_extra_parameters()}" in table


def test_noise_share_follows_epsilon_and_the_posterior(monteclora):
    before = summary(monteclora, num_samples=4, seed=0)
    monteclora.model.sample_scaler *= 2
    doubled = summary(monteclora, num_samples=4, seed=0)
    for a, b in zip(before, doubled):
        assert b["noise_share"] == pytest.approx(2 * a["noise_share"], rel=1e-5)
    with torch.no_grad():
        for posterior in monteclora.guide.posteriors.values():
            posterior.log_concentration[..., 0] += 3.0
            posterior.log_scale_diag -= 2.0
    moved = summary(monteclora, num_samples=4, seed=0)
    for a, b in zip(doubled, moved):
        assert b["weights_mean"][0] > 0.8 and b["covariance_diag"] == pytest.approx(4 * torch.e**-2, rel=1e-5)
        assert b["noise_share"] < a["noise_share"]


def test_render_model_text_says_when_the_data_plate_is_unscaled():
    from pyro_monteclora import MonteCLoRA, render_model_text
    from pyro_monteclora.testing import tiny_bert

    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    assert "unscaled" in render_model_text(mc) and "scaled by" not in render_model_text(mc)
    assert "scaled by 100/" in render_model_text(mc, dataset_size=100)
