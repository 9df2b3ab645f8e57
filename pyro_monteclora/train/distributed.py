"""Which accelerate setups :class:`~pyro_monteclora.MonteCLoRATrainer` runs under, and clear errors for the others.

Supported: one process, DDP over several processes (accelerate's ``MULTI_CPU``,
``MULTI_GPU`` and other ``MULTI_*`` types; ``accelerate launch --multi_gpu --num_processes N``,
which on a machine without GPUs starts torchrun on the gloo backend), and FSDP2 (``FSDP`` with
``fsdp_version: 2``; what is sharded: :mod:`pyro_monteclora.train.sharding`). Refused:

- DeepSpeed, Megatron-LM and FSDP1 (:func:`check_distributed_type`): they shard the parameters
  and gradients and reduce them inside their own backward pass, while the variational
  parameters' gradient is added after it
  (:meth:`HeldDraw.backward_to_guide <pyro_monteclora.train.draw.HeldDraw.backward_to_guide>`),
  so it would be lost or land on the wrong shard (accelerate's DeepSpeed wrapper even steps the
  optimizer inside ``backward``). FSDP2 is supported because it can leave the guide out of its
  shards (``ignored_params``); see docs/training.md, "More than one device";
- a process launched as one of several that accelerate runs as a single process
  (:func:`check_process_count`): on a machine without GPUs, ``TrainingArguments`` without
  ``use_cpu=True`` does that, and every process would train alone on all the data.

Example:
    >>> check_distributed_type("DistributedType.MULTI_CPU")
    >>> check_distributed_type("DistributedType.FSDP", fsdp=True, fsdp_version=2)
    >>> check_distributed_type("DistributedType.DEEPSPEED")
    Traceback (most recent call last):
    ...
    ValueError: MonteCLoRATrainer does not support accelerate's DeepSpeed: ...
"""

from __future__ import annotations

__all__ = ["check_distributed_type", "check_process_count", "REFUSED_DISTRIBUTED_TYPES", "SUPPORTED"]

#: accelerate's distributed types that shard and own the gradients, and their engines' names.
REFUSED_DISTRIBUTED_TYPES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM"}

SUPPORTED = (
    "Supported: one process, DDP over several processes (accelerate launch --multi_gpu --num_processes N, "
    "which runs DDP on CPUs too), or FSDP2 (fsdp_version: 2). See docs/training.md, 'More than one device'."
)


def check_distributed_type(kind: str, deepspeed: bool = False, fsdp: bool = False, fsdp_version: int = 2) -> None:
    """Refuse accelerate's DeepSpeed, Megatron-LM and FSDP1 (``kind``: ``str(accelerator.distributed_type)``;
    ``deepspeed``/``fsdp``: whether Trainer found that plugin, whatever ``kind`` says; ``fsdp_version``: the
    FSDP plugin's generation)."""
    refused = next((name for name in REFUSED_DISTRIBUTED_TYPES if name in kind), None)
    if refused == "FSDP" or (refused is None and fsdp and not deepspeed):
        refused = None if fsdp_version == 2 else "FSDP"
    if refused is None and deepspeed:
        refused = "DEEPSPEED"
    if refused == "FSDP":
        raise ValueError(
            f"MonteCLoRATrainer does not support accelerate's FSDP{fsdp_version} (fsdp_version={fsdp_version}): it "
            "flattens the guide's parameters into its own, and the variational gradient, added after the backward "
            "pass, would be lost. Set fsdp_version: 2. " + SUPPORTED
        )
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
