"""Which accelerate setups :class:`~pyro_monteclora.MonteCLoRATrainer` runs under, and clear errors for the others.

Supported: one process, and DDP over several processes (accelerate's ``MULTI_CPU``,
``MULTI_GPU`` and other ``MULTI_*`` types; ``accelerate launch --multi_gpu --num_processes N``,
which on a machine without GPUs starts torchrun on the gloo backend). Refused:

- DeepSpeed, FSDP and Megatron-LM (:func:`check_distributed_type`): they shard the parameters
  and gradients and reduce them inside their own backward pass, while the variational
  parameters' gradient is added after it
  (:meth:`HeldDraw.backward_to_guide <pyro_monteclora.train.draw.HeldDraw.backward_to_guide>`),
  so it would be lost or land on the wrong shard;
- a process launched as one of several that accelerate runs as a single process
  (:func:`check_process_count`): on a machine without GPUs, ``TrainingArguments`` without
  ``use_cpu=True`` does that, and every process would train alone on all the data.

Example:
    >>> check_distributed_type("DistributedType.MULTI_CPU")
    >>> check_distributed_type("DistributedType.FSDP")
    Traceback (most recent call last):
    ...
    ValueError: MonteCLoRATrainer does not support accelerate's FSDP: ...
"""

from __future__ import annotations

__all__ = ["check_distributed_type", "check_process_count", "REFUSED_DISTRIBUTED_TYPES", "SUPPORTED"]

#: accelerate's distributed types that shard and own the gradients, and their engines' names.
REFUSED_DISTRIBUTED_TYPES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM"}

SUPPORTED = (
    "Supported: one process, or DDP over several processes (accelerate launch --multi_gpu --num_processes N, "
    "which runs DDP on CPUs too). See docs/training.md, 'Several processes'."
)


def check_distributed_type(kind: str, deepspeed: bool = False, fsdp: bool = False) -> None:
    """Refuse accelerate's DeepSpeed, FSDP and Megatron-LM (``kind``: ``str(accelerator.distributed_type)``;
    ``deepspeed``/``fsdp``: whether Trainer found that plugin, whatever ``kind`` says)."""
    refused = next((name for name in REFUSED_DISTRIBUTED_TYPES if name in kind), None)
    if refused is None and (deepspeed or fsdp):
        refused = "DEEPSPEED" if deepspeed else "FSDP"
    if refused is not None:
        engine = REFUSED_DISTRIBUTED_TYPES[refused]
        raise ValueError(
            f"MonteCLoRATrainer does not support accelerate's {engine}: the variational parameters' gradient is "
            f"added after the backward pass, and {engine} shards and owns the gradients, so it would be lost. "
            + SUPPORTED
        )


def check_process_count(launched: int, running: int) -> None:
    """Refuse a process launched as one of ``launched`` (``WORLD_SIZE``) that accelerate runs as one of
    ``running``.

    Example:
        >>> check_process_count(launched=2, running=2)
        >>> check_process_count(launched=2, running=1)
        Traceback (most recent call last):
        ...
        ValueError: this process was launched as one of 2 (WORLD_SIZE=2), but the Trainer runs as 1 process: ...
    """
    if launched > 1 and running != launched:
        raise ValueError(
            f"this process was launched as one of {launched} (WORLD_SIZE={launched}), but the Trainer runs as "
            f"{running} process{'es' if running != 1 else ''}: each would train alone on all the data. On a machine "
            "without GPUs pass TrainingArguments(use_cpu=True) (pyro_monteclora.train does). " + SUPPORTED
        )
