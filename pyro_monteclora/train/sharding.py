"""FSDP2 for MonteCLoRA: what is sharded, what stays whole, and whole tensors for the adapter files.

Under accelerate's FSDP (``fsdp_version: 2``, torch's ``fully_shard``), :class:`MonteCLoRATrainer
<pyro_monteclora.MonteCLoRATrainer>` shards the network and keeps the guide whole:

- **sharded**: every decoder layer of the frozen base (its ``_no_split_modules`` class, e.g.
  ``LlamaDecoderLayer``, or the plugin's ``transformer_layer_cls_to_wrap``), with the LoRA A and
  B factors inside it, the embeddings and the head (accelerate's own units). FSDP all-gathers a
  layer for its forward and backward and reduce-scatters (averages) its A and B gradients, as
  DDP averages them;
- **whole on every process** (accelerate's ``ignored_modules``, set by :func:`configure_plugin`):
  the guide, a few numbers per layer group. Its gradient comes after the engine's backward pass
  (:meth:`HeldDraw.backward_to_guide <pyro_monteclora.train.draw.HeldDraw.backward_to_guide>`)
  and is averaged over processes by the trainer, exactly as under DDP.

Saving and resuming go through :func:`full_parameters`, which puts whole (all-gathered) copies
of the trainable tensors in place of their shards on every process, so the adapter files are
written by the same code as in one process and are the same files; on resume it writes the
loaded values back into each process's shard.

accelerate 1.16 turns FSDP on only on accelerator devices (``MULTI_GPU`` and the like): on CPUs
it drops the plugin and runs DDP without a word. :func:`enable_fsdp_on_cpu` turns it on there
(torch's ``fully_shard`` runs on CPUs with the gloo backend), which is what the tests use.

Example:
    >>> import torch
    >>> with full_parameters(torch.nn.Linear(2, 2)) as swapped:   # no DTensor: nothing to gather
    ...     swapped
    0
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch

__all__ = [
    "fsdp_version",
    "fsdp_launched",
    "requested_fsdp_plugin",
    "enable_fsdp_on_cpu",
    "configure_plugin",
    "local_tensor",
    "full_parameters",
    "save_optimizer",
    "load_optimizer",
    "ShardView",
    "all_reduce_min",
    "separate_groups",
]


def fsdp_version(plugin: Any) -> int:
    """The FSDP generation of accelerate's plugin (1 or 2)."""
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def requested_fsdp_plugin(plugin_args: Optional[dict]) -> Any:
    """The FSDP plugin asked for by ``TrainingArguments(fsdp=...)`` (``plugin_args``: its
    ``fsdp_plugin_args``) or by ``accelerate launch`` with an FSDP config (``ACCELERATE_USE_FSDP``),
    or ``None``."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if plugin_args is not None:
        return FullyShardedDataParallelPlugin(**plugin_args)
    if fsdp_launched():
        return FullyShardedDataParallelPlugin()
    return None


def enable_fsdp_on_cpu(accelerator: Any, plugin: Any) -> bool:
    """Turn on the FSDP ``plugin`` that accelerate dropped because the processes run on CPUs.

    accelerate (1.16) selects FSDP only for accelerator devices; several CPU processes get
    ``MULTI_CPU`` and would train as DDP although FSDP was asked for. Returns whether it turned
    FSDP on (only for FSDP2: FSDP1 is refused later with its reason).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU or fsdp_version(plugin) != 2:
        return False
    state.distributed_type = DistributedType.FSDP  # as accelerate sets it: on both shared states
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def configure_plugin(plugin: Any, guide: torch.nn.Module, column_kl: bool) -> None:
    """Keep ``guide`` out of the shards (whole on every process); refuse what is not supported.

    Raises:
        ValueError: FSDP1 (``fsdp_version`` 1), ``cpu_ram_efficient_loading``, or a column KL
            (``column_prior=True`` or ``variant="learned"``, whose gradient reaches the sharded
            A factors after the engine's backward pass).
    """
    version = fsdp_version(plugin)
    if version != 2:
        raise ValueError(
            f"MonteCLoRATrainer runs FSDP2 only (fsdp_version: 2, torch's fully_shard), got fsdp_version={version}: "
            "FSDP1 flattens the guide's parameters into its flat parameters, where the variational gradient added "
            "after the backward pass cannot reach them. Set fsdp_version: 2 in the accelerate config or "
            'fsdp_config={"version": 2}.'
        )
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ValueError(
            "MonteCLoRATrainer under FSDP does not support cpu_ram_efficient_loading=True (it moves the guide of "
            "every process but the first to the meta device; not tested): set it to false."
        )
    if column_kl:
        raise ValueError(
            "MonteCLoRATrainer under FSDP does not support column_prior=True or variant='learned': their KL's "
            "gradient reaches the A factors after the engine's backward pass, and FSDP holds A's gradient in "
            "shards by then. Train without them, or with DDP."
        )
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):
        raise ValueError(
            f"MonteCLoRATrainer sets FSDP's ignored_modules to its guide; got the pattern {ignored!r}: remove it"
        )
    plugin.ignored_modules = list(ignored or []) + [guide]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, write_back: bool = False) -> Iterator[int]:
    """Put whole copies of ``module``'s trainable DTensor parameters in their place, on every process.

    Every process must enter it (the copies are all-gathered). Inside, the module reads like an
    unsharded one (``state_dict``, ``load_state_dict``, plain ``copy_``); on exit the shards are
    put back and, with ``write_back=True``, each shard is overwritten with its part of the
    (possibly loaded) whole tensor. Yields how many parameters were replaced. Frozen parameters
    stay sharded: the adapter files hold none of them.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]] = []
    hooks: dict[int, tuple[torch.nn.Module, dict]] = {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                whole = torch.nn.Parameter(param.detach().full_tensor().clone(), requires_grad=True)
                owner._parameters[name] = whole
                swapped.append((owner, name, param, whole))
                # FSDP's hook after load_state_dict re-reads the shard of a DTensor: off while whole tensors
                # stand in; the values go into the shards below, in place
                hooks.setdefault(id(owner), (owner, dict(owner._load_state_dict_post_hooks)))
                owner._load_state_dict_post_hooks.clear()
    try:
        yield len(swapped)
    finally:
        for owner, saved in hooks.values():
            owner._load_state_dict_post_hooks.update(saved)
        for owner, name, shard, whole in swapped:
            owner._parameters[name] = shard
            if write_back:
                with torch.no_grad():
                    part = distribute_tensor(whole.detach(), shard.device_mesh, shard.placements, src_data_rank=None)
                    shard.to_local().copy_(part.to_local())


def save_optimizer(model: torch.nn.Module, optimizer: Any, scheduler: Any, folder: str, write: bool) -> None:
    """Write the optimizer's state (whole tensors, keyed by parameter name) and the scheduler's to
    ``folder`` as ``optimizer.pt`` and ``scheduler.pt``; every process must call it (the state is
    gathered), ``write`` on the one that writes. The frozen base is not written: the adapter
    files and this state are all a resume needs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)
    if write:
        torch.save(state, os.path.join(folder, OPTIMIZER_NAME))
        torch.save(scheduler.state_dict(), os.path.join(folder, SCHEDULER_NAME))


def load_optimizer(model: torch.nn.Module, optimizer: Any, scheduler: Any, folder: str) -> None:
    """Restore what :func:`save_optimizer` wrote, each process taking its shards of the state.

    Raises:
        FileNotFoundError: ``folder`` has no ``optimizer.pt`` (a checkpoint from another engine's run).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    path = os.path.join(folder, OPTIMIZER_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {OPTIMIZER_NAME}: it is not a checkpoint of an FSDP run")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state and isinstance(next(iter(state["state"]), None), int):
        raise ValueError(
            f"{path!r} is a one-process or DDP optimizer state (keyed by position); resume it without FSDP"
        )
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=options)
    scheduler.load_state_dict(torch.load(os.path.join(folder, SCHEDULER_NAME), weights_only=True))


class ShardView:
    """A parameter seen through this process's shard: ``.grad`` is the shard's gradient (the whole
    gradient without FSDP), for checks that run on each process's own part."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param = param

    @property
    def grad(self) -> Optional[torch.Tensor]:
        return None if self.param.grad is None else local_tensor(self.param.grad)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over processes (in place; every process must call it)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return tensor


def separate_groups(optimizer: torch.optim.Optimizer, whole: Any) -> None:
    """Give the parameters in ``whole`` (the guide's) param groups of their own, before any step.

    FSDP turns the other parameters into DTensors after the optimizer is built, and a fused or
    foreach optimizer cannot take plain tensors and DTensors in one group.
    """
    ids = {id(p) for p in whole}
    groups = []
    for group in optimizer.param_groups:
        for part in ([p for p in group["params"] if id(p) not in ids], [p for p in group["params"] if id(p) in ids]):
            if part:
                groups.append({**group, "params": part})
    optimizer.param_groups = groups
