"""MonteCLoRATrainer: loss weighting, the held draw under activation checkpointing, mixed precision.

Gradient tests pin the draw by reseeding the guide at every call (same base noise, same graph to
the variational parameters), set LoRA B != 0 and a large epsilon (0.1) so the noise reaches the loss,
and turn dropout off so that splitting a batch changes nothing but the summation order.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import pyro_monteclora
from pyro_monteclora import MonteCLoRA, MonteCLoRATrainer
from pyro_monteclora.models.model import MonteCLoRAModel
from pyro_monteclora.train import ELBOLoss
from pyro_monteclora.train.batches import examples_dataset
from pyro_monteclora.testing import TOY_WORDS, nonzero_lora_b, tiny_bert, tiny_llama, toy_sentiment, toy_tokenizer

EPSILON = 0.1  # the draw changes the gradients visibly; at 0.5 the tiny network saturates and float32
# rounding (different matmul shapes per micro-batch) reaches 30% of some near-zero gradients


def _rows(n=8):
    return [{"prompt": f"{TOY_WORDS[i % 8]} is", "completion": " ".join(TOY_WORDS[(i + j) % 8] for j in range(1 + i % 3))}
            for i in range(n)]


def _monteclora(epsilon=EPSILON, **overrides):
    mc = MonteCLoRA.from_model(
        tiny_llama(vocab_size=16), lora_r=4, lora_dropout=0.0, sample_scaler=epsilon, **overrides
    )
    nonzero_lora_b(mc.network)
    with torch.no_grad():  # a posterior away from the prior, so every variational gradient is non-trivial
        for posterior in mc.guide.posteriors.values():
            posterior.log_scale_diag.normal_(0, 0.3)
            posterior.log_concentration.normal_(0.5, 0.3)
    return mc


def _pin_draw(mc, seed=1234):
    """Every guide call draws the same base noise (hence the same adapter, graph attached)."""
    forward = mc.guide.forward

    def pinned(*args, **kwargs):
        torch.manual_seed(seed)
        return forward(*args, **kwargs)

    mc.guide.forward = pinned


class _GradientCatcher(TrainerCallback):
    def __init__(self, mc):
        self.mc, self.grads = mc, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.mc.named_parameters() if p.grad is not None}
        control.should_training_stop = True


def _args(tmp_path, **overrides):
    values = dict(per_device_train_batch_size=8, num_train_epochs=1, report_to="none", use_cpu=True,
                  disable_tqdm=True, save_strategy="no", logging_steps=1, max_grad_norm=0.0, learning_rate=1e-3)
    values.update(overrides)
    return TrainingArguments(str(tmp_path / "out"), **values)


def _step_gradients(tmp_path, word_tokenizer, mc_options=None, **args):
    torch.manual_seed(0)
    mc = _monteclora(**(mc_options or {}))
    _pin_draw(mc)
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    catcher = _GradientCatcher(mc)
    trainer = MonteCLoRATrainer(model=mc, args=_args(tmp_path, **args), train_dataset=data, data_collator=collator,
                                callbacks=[catcher])
    trainer.train()
    return catcher.grads


def _reference_gradients(word_tokenizer, **mc_options):
    """The plain objective on the whole batch, one process, no accumulation, no Trainer."""
    torch.manual_seed(0)
    mc = _monteclora(**mc_options)
    _pin_draw(mc)
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    batch = collator([data[i] for i in range(len(data))])
    mc.train()
    config = mc.monteclora_config
    elbo = ELBOLoss(mc.model, mc.guide, config.kl_weight, config.cooperative_weight, column_prior=config.column_prior)
    elbo(batch, dataset_size=len(data)).loss.backward()
    return {n: p.grad.detach().clone() for n, p in mc.named_parameters() if p.grad is not None}


def _assert_close(got, want, atol, label):
    assert set(got) == set(want), label
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=atol), (label, name, (got[name] - want[name]).abs().max())


@pytest.mark.parametrize("batch, accumulation", [(8, 1), (4, 2), (2, 4), (3, 3)])
def test_accumulated_gradient_equals_the_full_batch_gradient(tmp_path, word_tokenizer, batch, accumulation):
    want = _reference_gradients(word_tokenizer)
    guide = [n for n in want if ".posteriors." in n]
    assert guide and all(want[n].abs().max() > 1e-6 for n in guide)  # the draw reaches the variational parameters
    got = _step_gradients(tmp_path, word_tokenizer, per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation)
    _assert_close(got, want, 1e-5, f"batch {batch} x {accumulation}")


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_with_the_drawn_adapter(tmp_path, word_tokenizer, reentrant):
    want = _step_gradients(tmp_path, word_tokenizer)
    got = _step_gradients(tmp_path, word_tokenizer, activation_checkpointing=True,
                          activation_checkpointing_kwargs={"use_reentrant": reentrant})
    _assert_close(got, want, 1e-6, f"reentrant={reentrant}")


def test_the_checkpointing_test_catches_a_recompute_with_the_mean(tmp_path, word_tokenizer, monkeypatch):
    """Emptying the slots after the forward pass (the old behaviour) must make the comparison fail."""
    want = _step_gradients(tmp_path, word_tokenizer)
    forward = MonteCLoRAModel.forward

    def releasing(self, batch, dataset_size=None, hold=None):
        logits = forward(self, batch, dataset_size, hold)
        for group in self.groups:
            group.slot.value = None
        return logits

    monkeypatch.setattr(MonteCLoRAModel, "forward", releasing)
    got = _step_gradients(tmp_path, word_tokenizer, activation_checkpointing=True)
    differences = [float((got[n] - want[n]).abs().max()) for n in want if n in got]
    assert max(differences) > 1e-4


def _train(word_tokenizer, model=None, **overrides):
    torch.manual_seed(0)
    model = model if model is not None else tiny_llama(vocab_size=16)
    values = dict(tokenizer=word_tokenizer, num_epochs=2, batch_size=4, lora_r=4, lora_dropout=0.0,
                  sample_scaler=EPSILON, learning_rate=1e-2, progress=False, seed=3)
    values.update(overrides)
    return pyro_monteclora.train(model, _rows(12), **values)


LARGE_EPSILON = 0.5  # the noise dominates A's update direction; training stays finite


def _trainable(mc):
    return {n: p.detach().clone() for n, p in mc.named_parameters() if p.requires_grad}


def _trained_by_trainer(tmp_path, word_tokenizer, **args):
    """Six AdamW steps with clipping, from B != 0 and a large epsilon, the real draws (not pinned)."""
    torch.manual_seed(0)
    mc = _monteclora(LARGE_EPSILON)
    assert all(p.abs().max() > 0.1 for n, p in mc.named_parameters() if "lora_B" in n)
    data, collator = examples_dataset(mc, _rows(12), word_tokenizer, max_length=32)
    trainer = MonteCLoRATrainer(model=mc, args=_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=2,
                                                     learning_rate=1e-2, max_grad_norm=1.0, seed=3, **args),
                                train_dataset=data, data_collator=collator)
    trainer.train()
    assert trainer.state.global_step == 6
    return _trainable(mc), mc.is_activation_checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_trained_tensors_are_equal_with_and_without_checkpointing(tmp_path, word_tokenizer, reentrant):
    want, off = _trained_by_trainer(tmp_path, word_tokenizer)
    got, on = _trained_by_trainer(tmp_path, word_tokenizer, activation_checkpointing=True,
                                  activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert on and not off
    torch.manual_seed(0)
    start = _trainable(_monteclora(LARGE_EPSILON))
    assert all(not torch.equal(start[n], want[n]) for n in want)  # every tensor trained (A, B, head, posterior)
    _assert_close(got, want, 1e-6, f"trained tensors, reentrant={reentrant}")


def test_train_with_and_without_checkpointing_gives_the_same_tensors(word_tokenizer):
    """``train()`` (non-reentrant, its only mode) on a MonteCLoRA with B != 0 and a large epsilon."""
    def run(**overrides):
        torch.manual_seed(0)
        return _train(word_tokenizer, model=_monteclora(LARGE_EPSILON), sample_scaler=LARGE_EPSILON, **overrides)

    plain = run(gradient_checkpointing=False)
    checkpointed = run()  # None: on for a causal LM
    assert checkpointed.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert any("lora_B" in n for n in _trainable(plain.model))
    _assert_close(_trainable(checkpointed.model), _trainable(plain.model), 1e-6, "trained tensors")


@pytest.mark.parametrize("setting, want", [(None, False), (True, True)])
def test_gradient_checkpointing_none_is_off_for_a_classifier(setting, want):
    result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=toy_tokenizer(), num_epochs=1,
                                   batch_size=8, lora_r=4, progress=False, gradient_checkpointing=setting)
    assert result.model.is_activation_checkpointing is want


@pytest.mark.parametrize("checkpointing", [False, True])
def test_column_prior_gradient_through_the_held_draw_equals_the_plain_objectives(tmp_path, word_tokenizer,
                                                                                  checkpointing):
    """The column prior's KL depends on A as well as on the draw: the held-draw path must add its
    gradient to A (the network's backward pass does not see it)."""
    options = dict(column_prior=True, kl_weight=1e-3)  # its KL outweighs 8 examples at weight 1
    want = _reference_gradients(word_tokenizer, **options)
    got = _step_gradients(tmp_path, word_tokenizer, mc_options=options, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, activation_checkpointing=checkpointing)
    _assert_close(got, want, 1e-5, f"column prior, checkpointing {checkpointing}")
    plain = _reference_gradients(word_tokenizer)
    lora_a = [n for n in want if "lora_A" in n]
    assert lora_a and any(not torch.allclose(want[n], plain[n], atol=1e-4) for n in lora_a)  # the prior reaches A


def test_bf16_autocast_trains_with_float32_probability(word_tokenizer, monkeypatch):
    dtypes = {}
    take = pyro_monteclora.train.draw.HeldDraw.take

    def recording(self, noise):
        dtypes["noise"] = {v.dtype for v in noise.values()}
        dtypes["autocast"] = torch.is_autocast_enabled("cpu")
        return take(self, noise)

    monkeypatch.setattr(pyro_monteclora.train.draw.HeldDraw, "take", recording)
    result = _train(word_tokenizer, mixed_precision="bf16", num_epochs=1, learning_rate=1e-3)
    assert dtypes == {"noise": {torch.float32}, "autocast": True}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(p.dtype == torch.float32 for p in result.model.guide.parameters())
    mc = result.model
    data, collator = examples_dataset(mc, _rows(4), word_tokenizer, max_length=32)
    batch = collator([data[i] for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = ELBOLoss(mc.model, mc.guide)(batch, dataset_size=4)
    assert terms.kl.dtype == torch.float32 and terms.cooperative.dtype == torch.float32
    assert terms.nll.dtype == torch.float32  # bf16 logits are scored in float32


def test_log_history_has_the_loss_parts_and_history_one_record_per_step(word_tokenizer):
    result = _train(word_tokenizer, log_every=2, gradient_accumulation_steps=2)
    assert len(result.history) == 2 * 2  # 12 rows / (4 x 2) = 2 optimizer steps per epoch
    logged = [r for r in result.log_history if "loss" in r]
    assert logged and all({"nll", "kl", "cooperative"} <= set(r) for r in logged)
    assert all(r["lr"] > 0 for r in result.history)  # no step runs at learning rate 0


def test_the_mixin_works_in_front_of_trl_sft_trainer(tmp_path, word_tokenizer):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from pyro_monteclora import MonteCLoRATrainerMixin

    class MonteCLoRASFTTrainer(MonteCLoRATrainerMixin, trl.SFTTrainer):
        pass

    tokenizer = copy.deepcopy(word_tokenizer)  # SFT needs an eos token; the session fixture stays as it is
    tokenizer.eos_token = "[SEP]"
    mc = _monteclora()
    args = trl.SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=1, report_to="none",
                         use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, max_length=32)
    trainer = MonteCLoRASFTTrainer(model=mc, args=args, train_dataset=Dataset.from_list(_rows(8)),
                                   processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in mc.guide.named_parameters()}
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 2 and all({"nll", "kl", "cooperative"} <= set(r) for r in logged)
    assert any(not torch.equal(before[n], p) for n, p in mc.guide.named_parameters())  # the posterior trained



def test_the_redrawn_adapter_equals_the_held_one_bitwise(word_tokenizer):
    """The variational gradient is taken through a redraw from the captured random state: it must be
    the very draw the layers used, even though dropout consumed random numbers in between."""
    from pyro_monteclora.train.draw import HeldDraw

    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4, lora_dropout=0.3, sample_scaler=EPSILON)
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    batch = collator([data[i] for i in range(4)])
    mc.train()
    hold = HeldDraw(mc.groups)
    elbo = ELBOLoss(mc.model, mc.guide)
    terms = elbo(batch, dataset_size=8, hold=hold)
    assert terms.nll.requires_grad and not terms.kl.requires_grad  # the guide's side has no graph here
    hold.remember(lambda: (elbo.guide_terms(8)[0], torch.zeros(())))
    after = torch.get_rng_state()
    noise, _ = hold._redraw()
    assert set(noise) == set(hold.leaves)
    for name, leaf in hold.leaves.items():
        assert torch.equal(noise[name], leaf) and noise[name].requires_grad
    assert torch.equal(torch.get_rng_state(), after)  # the caller's random state is left as it was
    hold.release()
    assert all(g.slot.value is None for g in mc.groups)


def test_save_model_writes_an_adapter_folder_that_load_reads(tmp_path, word_tokenizer):
    mc = _monteclora()
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    trainer = MonteCLoRATrainer(model=mc, args=_args(tmp_path, max_grad_norm=1.0), train_dataset=data,
                                data_collator=collator, processing_class=word_tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(tmp_path / "saved"))  # no pickles
    again = pyro_monteclora.load(tiny_llama(vocab_size=16), tmp_path / "saved")
    batch = collator([data[0], data[1]])
    with torch.no_grad():
        assert torch.equal(again.mean_logits(batch), mc.eval().mean_logits(batch))
    for name, value in mc.guide.state_dict().items():
        assert torch.equal(again.guide.state_dict()[name], value), name


def test_fp16_on_the_cpu_is_refused_clearly(word_tokenizer):
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU.*bf16"):
        _train(word_tokenizer, mixed_precision="fp16")


@pytest.mark.parametrize("kind, engine", [("DEEPSPEED", "DeepSpeed"), ("MEGATRON_LM", "Megatron-LM")])
def test_sharding_engines_are_refused_with_what_is_supported(tmp_path, word_tokenizer, monkeypatch, kind, engine):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from pyro_monteclora.train.distributed import check_distributed_type

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    mc = _monteclora()
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    with pytest.raises(ValueError, match=rf"does not support accelerate's {engine}: .* Supported: one process, DDP"):
        MonteCLoRATrainer(model=mc, args=_args(tmp_path), train_dataset=data, data_collator=collator)
    for supported in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_distributed_type(str(DistributedType[supported]))
    check_distributed_type(str(DistributedType.FSDP), fsdp=True, fsdp_version=2)  # FSDP2: tests/test_trainer_fsdp.py
    with pytest.raises(ValueError, match="FSDP1 .*fsdp_version=1.*Set fsdp_version: 2"):
        check_distributed_type(str(DistributedType.FSDP), fsdp=True, fsdp_version=1)
    with pytest.raises(ValueError, match="DeepSpeed"):  # a plugin is enough, whatever the type says
        check_distributed_type(str(DistributedType.MULTI_GPU), deepspeed=True)


def test_fsdp_refuses_what_it_cannot_shard(monkeypatch):
    """FSDP1, cpu_ram_efficient_loading and a column KL are refused naming the setting; the guide is kept whole;
    train() refuses an FSDP launch (it saves the whole model afterwards)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from pyro_monteclora.train.sharding import configure_plugin

    mc = _monteclora()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    configure_plugin(plugin, mc.guide, column_kl=False)
    assert plugin.ignored_modules == [mc.guide]
    with pytest.raises(ValueError, match="fsdp_version=1"):
        configure_plugin(FullyShardedDataParallelPlugin(fsdp_version=1), mc.guide, column_kl=False)
    with pytest.raises(ValueError, match="column_prior=True or variant='learned'"):
        configure_plugin(FullyShardedDataParallelPlugin(fsdp_version=2), mc.guide, column_kl=True)
    for name in ("FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_SYNC_MODULE_STATES"):  # the plugin writes them: restore
        monkeypatch.setenv(name, os.environ.get(name, "false"))
    with pytest.raises(ValueError, match="cpu_ram_efficient_loading"):
        configure_plugin(FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True), mc.guide,
                         column_kl=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="not FSDP .*Use MonteCLoRATrainer"):
        pyro_monteclora.train(mc, _rows(), progress=False)


def test_a_launched_process_that_would_train_alone_is_refused(tmp_path, word_tokenizer, monkeypatch):
    """torchrun's WORLD_SIZE=2 with a Trainer that runs as one process (no use_cpu=True on a machine without
    GPUs): each process would train alone on all the data."""
    mc = _monteclora()
    data, collator = examples_dataset(mc, _rows(), word_tokenizer, max_length=32)
    args = _args(tmp_path)
    assert args.world_size == 1  # accelerate's state is set up before the variable appears
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launched as one of 2 .* runs as 1 process: .*use_cpu=True"):
        MonteCLoRATrainer(model=mc, args=args, train_dataset=data, data_collator=collator)
