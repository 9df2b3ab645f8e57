"""The Pyro model and guide: E[A~] = A, the ELBO, gradients, the mean adapter, vectorized sites."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Dirichlet, kl_divergence

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.distributions import wishart_kl
from pyro_monteclora.layers import noise_context
from pyro_monteclora.models import adapter_noise
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert, tiny_llama
from pyro_monteclora.train import ELBOLoss


def _batch(labels=(1, 0, 1)):
    n = len(labels)
    return {
        "input_ids": torch.tensor([[2, 4, 9, 3], [2, 8, 3, 0], [2, 5, 10, 3]])[:n],
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])[:n],
        "labels": torch.tensor(labels),
        "index": torch.arange(n),
    }


def _draw_latents(mc, num_samples):
    def vectorized():
        with pyro.plate("samples", num_samples, dim=-2):
            return mc.guide()

    return poutine.block(vectorized)()


def test_expected_adapter_equals_lora_mean():
    torch.manual_seed(0)
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, sample_scaler=0.05)
    nonzero_lora_b(mc.network)
    mc.eval()
    group = mc.groups[0]
    layer = mc.network.get_submodule("base_model.model." + group.module_names[0]).lora_A["default"]
    n = 4000
    with torch.no_grad():
        noise = mc.model.noise(_draw_latents(mc, n))
        eye = torch.eye(group.in_features).repeat(n, 1)  # one identity block per draw
        with noise_context(mc.groups, noise):
            draws = layer(eye).reshape(n, group.in_features, group.rank).transpose(1, 2)  # (n, r, d) = A~
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert bool((stderr > 0).all()), "the adapter draws carry no noise"
    assert bool(((mean - layer.weight).abs() <= 5 * stderr).all())
    # and the noise is visible in the network's outputs once B != 0
    batch = _batch()
    assert not torch.allclose(mc.sample_logits(batch), mc.mean_logits(batch))


def test_collapsed_components_have_the_same_law():
    # Given pi and L, both constructions give columns ~ N(0, eps^2 ||pi||^2 L L^T).
    torch.manual_seed(0)
    layers, n_comp, d, r, n = 1, 4, 3, 2, 40_000
    tril = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    target = (pi**2).sum() * tril[0] @ tril[0].T
    for collapsed, shape in ((False, (n, layers, n_comp, d, r)), (True, (n, layers, d, r))):
        noise = adapter_noise(tril, pi, torch.randn(shape), scaler=1.0, collapsed=collapsed)  # (n, 1, r, d)
        columns = noise[:, 0].permute(0, 2, 1).reshape(-1, r)
        cov = columns.T @ columns / columns.shape[0]
        # entries of a sample covariance have std <= sqrt(2) * max variance / sqrt(samples)
        tolerance = 5 * math.sqrt(2) * float(target.diagonal().max()) / math.sqrt(columns.shape[0])
        assert torch.allclose(cov, target, atol=tolerance), (collapsed, cov, target)


def test_model_and_guide_sites_are_vectorized_per_group():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    trace = poutine.trace(mc.model).get_trace(_batch(), dataset_size=10)
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not n.endswith("layers") and n != "data"]
    assert len(latent) == 3 * len(mc.groups) == 6
    assert trace.nodes["d16.components"]["value"].shape == (6, 4, 16, 4)
    ungrouped = MonteCLoRA.from_model(tiny_bert(), lora_r=4, group_layers=False)
    assert len(ungrouped.groups) == 7
    assert ungrouped.num_extra_parameters() == mc.num_extra_parameters() == 7 * (4 + 4)


def test_site_count_does_not_grow_with_depth():
    def sites(num_layers):
        mc = MonteCLoRA.from_model(tiny_llama(num_layers=num_layers), lora_r=4)
        trace = poutine.trace(mc.guide).get_trace()
        return sum(1 for s in trace.nodes.values() if s["type"] == "sample")

    assert sites(1) == sites(4)


def test_elbo_loss_equals_independent_computation_and_pyro_elbo():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, cooperative_weight=0.0)
    nonzero_lora_b(mc.network)
    with torch.no_grad():  # move the guide away from the prior so the KL is not zero
        for posterior in mc.guide.posteriors.values():
            posterior.log_scale_diag.normal_(0.0, 0.3)
            posterior.log_concentration.normal_(0.0, 0.5)
    mc.eval()  # no dropout: the forward pass is a function of the draw only
    batch, dataset_size = _batch(), 30
    objective = ELBOLoss(mc.model, mc.guide, kl_weight=1.0, cooperative_weight=0.0)

    torch.manual_seed(3)
    terms = objective(batch, dataset_size)
    torch.manual_seed(3)
    guide_trace = poutine.trace(mc.guide).get_trace(batch, dataset_size)
    latents = {
        g.name: tuple(guide_trace.nodes[f"{g.name}.{s}"]["value"] for s in ("covariance_tril", "weights", "components"))
        for g in mc.groups
    }
    noise = {g: adapter_noise(*latents[g], mc.monteclora_config.sample_scaler) for g in latents}
    with noise_context(mc.groups, noise):
        logits = mc.network(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_lik = -torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") * dataset_size / 3
    kl = 0.0
    for name, posterior in mc.guide.posteriors.items():
        r = posterior.group.rank
        tril_q = torch.diag_embed((0.5 * posterior.log_scale_diag).exp())
        kl = kl + wishart_kl(posterior.df, tril_q, torch.tensor(float(r)), torch.eye(r)).sum()
        prior = torch.ones_like(posterior.concentration) * mc.monteclora_config.dirichlet_concentration
        kl = kl + kl_divergence(Dirichlet(posterior.concentration), Dirichlet(prior)).sum()
    assert float(kl.detach()) > 0.1
    assert torch.allclose(terms.nll * dataset_size, -log_lik, rtol=1e-5)
    assert torch.allclose(terms.kl * dataset_size, kl, rtol=1e-5)
    assert torch.allclose(terms.loss, terms.nll + terms.kl)

    torch.manual_seed(3)
    pyro_loss = TraceMeanField_ELBO().differentiable_loss(mc.model, mc.guide, batch, dataset_size)
    assert torch.allclose(pyro_loss, (terms.nll + terms.kl) * dataset_size, rtol=1e-5)


def test_kl_weight_and_cooperative_loss_enter_the_objective():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    with torch.no_grad():
        for posterior in mc.guide.posteriors.values():
            posterior.log_scale_diag.add_(0.5)
    batch = _batch()
    torch.manual_seed(0)
    plain = ELBOLoss(mc.model, mc.guide, 1.0, 0.0)(batch, 30)
    torch.manual_seed(0)
    weighted = ELBOLoss(mc.model, mc.guide, 0.5, 2.0)(batch, 30)
    assert torch.allclose(weighted.loss, plain.nll + 0.5 * plain.kl + 2.0 * weighted.cooperative)
    assert 1 / 4 <= float(weighted.cooperative) <= 1.0


def test_gradients_reach_adapter_head_and_variational_parameters_only():
    base = tiny_bert()
    mc = MonteCLoRA.from_model(base, lora_r=4)
    nonzero_lora_b(mc.network)
    terms = ELBOLoss(mc.model, mc.guide)(_batch(), 30)
    terms.loss.backward()
    for name, param in mc.network.named_parameters():
        if param.requires_grad:
            assert "lora_" in name or "classifier" in name, name
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    for name, param in mc.guide.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_mean_adapter_equals_stock_peft_lora(factory):
    base = factory()
    reference_base = copy.deepcopy(base)
    mc = MonteCLoRA.from_model(base, lora_r=4, lora_alpha=8)
    nonzero_lora_b(mc.network)
    task = TaskType.SEQ_CLS if mc.task == "classification" else TaskType.CAUSAL_LM
    stock = get_peft_model(reference_base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task))
    missing = stock.load_state_dict(mc.network.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    mc.eval()
    stock.eval()
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.allclose(mc.mean_logits(batch), stock(**inputs).logits, atol=1e-6)
        assert not torch.allclose(mc.sample_logits(batch), stock(**inputs).logits, atol=1e-6)
        # forward takes the network's other arguments as they are (only tensors move to its device)
        assert torch.allclose(mc(**inputs, return_dict=True).logits, stock(**inputs).logits, atol=1e-6)


def test_guide_starts_at_the_prior_and_has_r_plus_n_parameters_per_layer():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, num_components=3)
    terms = ELBOLoss(mc.model, mc.guide)(_batch(), 10)
    assert float(terms.kl) == pytest.approx(0.0, abs=1e-6)
    layers = sum(g.num_layers for g in mc.groups)
    assert mc.num_extra_parameters() == layers * (4 + 3)


def test_causal_lm_logits_on_answer_positions_only_give_the_same_elbo(word_tokenizer):
    """The LM head on the answer positions (logits_to_keep) scores exactly as full logits do."""
    from pyro_monteclora.testing import tiny_llama
    from pyro_monteclora.train import ELBOLoss
    from pyro_monteclora.train.batches import examples_dataset

    rows = [{"prompt": "the good is", "completion": "bad"}, {"prompt": "is", "completion": "the good bad is"}]
    values = {}
    for on_targets in (True, False):
        torch.manual_seed(0)
        mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4, lora_dropout=0.0, sample_scaler=0.5)
        nonzero_lora_b(mc.network)
        mc.model.logits_on_targets = on_targets
        data, collator = examples_dataset(mc, rows, word_tokenizer, max_length=32)
        batch = collator([data[0], data[1]])
        torch.manual_seed(1)
        terms = ELBOLoss(mc.model, mc.guide)(batch, dataset_size=2)
        terms.loss.backward()
        values[on_targets] = (terms.nll.detach(), {n: p.grad.clone() for n, p in mc.named_parameters() if p.grad is not None})
    assert MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4).model.logits_on_targets  # on by default here
    assert torch.allclose(values[True][0], values[False][0], rtol=1e-6)
    for name, grad in values[False][1].items():
        assert torch.allclose(values[True][1][name], grad, atol=1e-6), name


def test_candidate_scoring_on_answer_positions_only_equals_full_logits(word_tokenizer):
    from pyro_monteclora.prediction.predictive import Predictive
    from pyro_monteclora.testing import tiny_llama
    from pyro_monteclora.train.batches import examples_dataset

    rows = [{"prompt": "the good is", "completion": "bad"}, {"prompt": "is", "completion": "the good bad is"}]
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4, sample_scaler=0.5)
    nonzero_lora_b(mc.network)
    data, collator = examples_dataset(mc, rows, word_tokenizer, max_length=32)
    batch = collator([data[0], data[1]])
    scores = {}
    for on_targets in (True, False):
        mc.model.logits_on_targets = on_targets
        for mode in ("sample", "mean"):
            scores[on_targets, mode] = Predictive(mc, 3, seed=0, mode=mode).sample_sequence_log_likelihood(batch)
    for mode in ("sample", "mean"):
        assert torch.allclose(scores[True, mode], scores[False, mode], atol=1e-5), mode
    assert not torch.allclose(scores[True, "sample"][0], scores[True, "sample"][1])  # the draws differ


def test_attaching_shows_no_peft_deprecation_warning_and_leaves_the_filters_alone():
    import warnings

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MonteCLoRA.from_model(tiny_llama(), lora_r=4)
        shown = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert shown == []
    assert warnings.filters == before


def test_causal_lm_likelihood_equals_cross_entropy_over_the_kept_tokens():
    """Full logits and logits on the kept positions only both give the per-sequence token
    cross-entropy, scaled from the batch to the dataset; gaps and a sequence with nothing kept included."""
    from pyro_monteclora.models import IGNORE_INDEX, causal_lm_likelihood
    from pyro_monteclora.models.likelihood import target_positions

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt, then the answer
    labels[1, [0, 2, 5]] = IGNORE_INDEX  # kept tokens with gaps
    labels[2] = IGNORE_INDEX  # nothing to score
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(3, 5)
    expected = -per_token.sum(1)  # each sequence is one observation
    assert expected[2] == 0 and (expected[:2] < 0).all()

    def log_likelihood(full: bool):
        if full:
            args = (logits, labels)
            kwargs = {}
        else:
            where, valid = target_positions(labels)
            kept = logits.gather(1, where[..., None].expand(*where.shape, 11))
            args, kwargs = (kept, labels), {"positions": (where, valid)}
        trace = poutine.trace(causal_lm_likelihood).get_trace(*args, dataset_size=12, subsample=torch.arange(3), **kwargs)
        site = trace.nodes["obs"]
        assert site["value"].shape == (3, 3)  # only the kept positions are normalized, full logits or not
        return site["fn"].log_prob(site["value"]), trace.log_prob_sum()

    for full in (True, False):
        per_sequence, total = log_likelihood(full)
        assert torch.allclose(per_sequence, expected, atol=1e-12), full
        assert torch.allclose(total, expected.sum() * 12 / 3, atol=1e-10), full
        (grad,) = torch.autograd.grad(total, logits)
        (reference,) = torch.autograd.grad(expected.sum() * 4, logits, retain_graph=True)
        assert torch.allclose(grad, reference, atol=1e-12), full
