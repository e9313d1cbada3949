"""
FSDP (PyTorch FSDP2, `fully_shard`) for the two training stages, on GPUs and on CPU over gloo.

`--fsdp` (with `--fsdp_config`, or `accelerate launch --config_file examples/configs/fsdp.yaml`) shards the model
with the Trainer's own FSDP2 support (accelerate's FSDP plugin), saving and resuming FSDP checkpoints as the Trainer
does. Three things are added here so that it works for OmniFusion and on CPU:

- CPU: accelerate (1.15) turns its FSDP plugin on only for accelerator devices; on CPU it would quietly run DDP.
  `enable_fsdp_on_cpu` switches the Trainer's accelerator to FSDP when `--fsdp --use_cpu` is asked for with several
  processes: accelerate's FSDP2 code paths then run unchanged on the CPU device mesh (`fully_shard` on a 1-D mesh
  of the gloo process group).
- What is wrapped: by default the Trainer wraps the classes a model lists in `_no_split_modules`; OmniFusion's come
  from its parts and include classes it does not have (CLIP's text embeddings), which accelerate refuses.
  `default_wrap_classes` keeps those the model has (the LM's decoder layers, the vision encoder's layers).
- The optimizer: transformers' Adafactor (the released code's, the scripts' default) keeps its factored second
  moments in plain tensors of the full shape, which cannot be mixed with FSDP2's sharded (DTensor) gradients.
  `ShardedAdafactor` takes the same step on each process's rows, summing across processes what needs every row
  (column means, parameter and update RMS), with its states as DTensors that FSDP checkpoints save and restore.

At exit the process group is destroyed (`end_distributed`): without it a CPU FSDP2 process hangs once its script
is done. Saving: `fully_shard` gives each wrapped module a new class (`FSDPOmniFusionForCausalLM`, defined in
torch), and `save_pretrained` would ship torch's FSDP files as the folder's remote code; `plain_class` restores the
model's own class while it saves.
"""

import atexit
import contextlib
import logging
import math

import torch
from transformers.optimization import Adafactor

logger = logging.getLogger("omnifusion_fsdp")  # the name the log lines show; `setup_run` sets its level


def fsdp_requested(training_args) -> bool:
    return bool(training_args.fsdp)


def check_distributed_arguments(training_args, launched: int):
    """
    The combinations that cannot work, refused up front with what to use instead: `--fsdp` in one process (nothing to
    shard across), FSDP1 on CPU (only FSDP2 runs on a CPU mesh) and DeepSpeed on CPU (it needs an accelerator).
    """
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    if training_args.deepspeed and on_cpu:
        raise ValueError(
            f"--deepspeed {training_args.deepspeed}: DeepSpeed needs GPUs (or other accelerators), not tested on CPU. "
            "On CPU, train with several processes through FSDP (torchrun --nproc_per_node 2 ... --use_cpu --fsdp "
            "full_shard) or DDP (the same without --fsdp)."
        )
    if not fsdp_requested(training_args):
        return
    if launched < 2:
        raise ValueError(
            "--fsdp shards the model across processes, but this run is one process. Launch several, e.g. "
            "`torchrun --nproc_per_node 2 examples/train_stage2_sft.py ... --fsdp full_shard` (add --use_cpu on CPU), "
            "or drop --fsdp to train in one process."
        )
    version = int(training_args.fsdp_config.get("version", 2))
    if on_cpu and version != 2:
        raise ValueError(
            f"--fsdp_config version {version}: only FSDP2 (version 2, the default) runs on CPU; drop the version "
            "setting to use FSDP2."
        )


def default_wrap_classes(model: torch.nn.Module, training_args):
    """With transformer-layer wrapping and no classes named (`--fsdp_config` `transformer_layer_cls_to_wrap`),
    wrap the `_no_split_modules` classes the model actually has; a model's own choice is kept."""
    plugin_args = training_args.fsdp_plugin_args
    if plugin_args is None or "TRANSFORMER" not in str(plugin_args.get("auto_wrap_policy", "")).upper():
        return
    if plugin_args.get("transformer_cls_names_to_wrap"):
        return
    present = {type(module).__name__ for module in model.modules()}
    classes = sorted(set(getattr(model, "_no_split_modules", None) or ()) & present)
    if classes:
        plugin_args["transformer_cls_names_to_wrap"] = ",".join(classes)
        logger.info("FSDP wraps each %s.", ", ".join(classes))


def enable_fsdp_on_cpu(trainer):
    """
    Turn the Trainer's accelerator to FSDP where accelerate left `--fsdp` off because the device is the CPU (it enables
    its FSDP plugin for accelerator devices only): the distributed type becomes FSDP with the plugin the Trainer made
    from `--fsdp`/`--fsdp_config`, so that `accelerator.prepare` shards the model with FSDP2 and the Trainer saves
    and resumes FSDP checkpoints.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"--fsdp is on but accelerate runs as {state.distributed_type} on {state.device}: FSDP on CPU needs "
            "several processes with --use_cpu (torchrun --nproc_per_node 2 ... --use_cpu --fsdp full_shard)."
        )
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP  # AcceleratorState's shared state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    atexit.register(end_distributed)
    logger.info(
        "FSDP2 on CPU over %s: %d processes, the model sharded across them.", state.backend, state.num_processes
    )


def _shard_placements(placements, ndim: int, dropped: int):
    """`placements` of a tensor of `ndim` dims, for its reduction over dim `dropped` (which disappears)."""
    from torch.distributed.tensor import Replicate, Shard

    result = []
    for placement in placements:
        if isinstance(placement, Shard):
            dim = placement.dim % ndim
            if dim == dropped:
                result.append(Replicate())
            else:
                result.append(Shard(dim - 1 if dim > dropped else dim))
        else:
            result.append(Replicate())
    return result


class ShardedAdafactor(Adafactor):
    """
    transformers' `Adafactor` (same hyper-parameters, same update) for parameters that FSDP2 shards by rows (DTensor,
    `Shard(0)` on a 1-D mesh). Each process updates its own rows; what the update needs from all rows is summed across
    the processes: the column means of the squared gradient (for a matrix, whose rows are split) and the mean of the
    row statistics, the parameter's and the update's RMS. The states are DTensors laid out like the gradient (the row
    statistics sharded with the rows, a matrix's column statistics replicated), so that the Trainer's FSDP checkpoints
    save and restore them as they do for any optimizer. Plain-tensor parameters are left to `Adafactor`.
    """

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plain_groups = []
        for group in self.param_groups:
            sharded = [param for param in group["params"] if isinstance(param, DTensor) and param.grad is not None]
            for param in sharded:
                self._sharded_step(param, group)
            plain_groups.append([param for param in group["params"] if not isinstance(param, DTensor)])
        # the plain parameters, if any: Adafactor's own step, with the sharded ones hidden from it
        all_params = [group["params"] for group in self.param_groups]
        try:
            for group, params in zip(self.param_groups, plain_groups):
                group["params"] = params
            super().step()
        finally:
            for group, params in zip(self.param_groups, all_params):
                group["params"] = params
        return loss

    def _sharded_step(self, param, group):
        from torch.distributed.tensor import Shard, zeros

        if len(param.placements) != 1 or param.placements[0] != Shard(0):
            raise ValueError(f"ShardedAdafactor: expected FSDP2's Shard(0) on a 1-D mesh, got {param.placements}.")
        process_group = param.device_mesh.get_group()

        def total(value: torch.Tensor) -> torch.Tensor:  # summed over all processes
            torch.distributed.all_reduce(value, group=process_group)
            return value

        grad = param.grad.to_local()
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        shape, ndim = tuple(param.shape), param.ndim
        factored, use_first_moment = self._get_options(group, shape)
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["RMS"] = 0
            dtype = grad.dtype
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(param.grad, dtype=dtype)
            if factored:
                for name, dropped in (("exp_avg_sq_row", ndim - 1), ("exp_avg_sq_col", ndim - 2)):
                    state[name] = zeros(
                        shape[:dropped] + shape[dropped + 1 :],
                        dtype=dtype,
                        device_mesh=param.device_mesh,
                        placements=_shard_placements(param.placements, ndim, dropped),
                    )
            else:
                state["exp_avg_sq"] = torch.zeros_like(param.grad, dtype=dtype)
        weights = param.to_local()
        weights32 = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
        numel = param.numel()

        state["step"] += 1
        state["RMS"] = float(total(weights32.double().pow(2).sum()).sqrt() / numel**0.5)
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"].to_local(), state["exp_avg_sq_col"].to_local()
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            if ndim == 2:  # the rows are split: the column means are over every process's rows
                col_mean = total(update.sum(dim=-2)) / shape[0]
                row_mean = total(row.sum(dim=-1, keepdim=True)) / shape[0]
            else:  # the split is along a dimension both statistics keep
                col_mean = update.mean(dim=-2)
                row_mean = row.mean(dim=-1, keepdim=True)
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
            update = (row / row_mean).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
            update.mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"].to_local()
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update_rms = total(update.double().pow(2).sum()).sqrt() / numel**0.5
        update.div_((update_rms.to(update.dtype) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"].to_local()
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        if group["weight_decay"] != 0:
            weights32.add_(weights32, alpha=-group["weight_decay"] * lr)
        weights32.add_(-update)
        if weights32 is not weights:
            weights.copy_(weights32)


def use_sharded_adafactor(optimizer):
    """The Trainer's Adafactor, made `ShardedAdafactor` (same state and hyper-parameters: only `step` differs)."""
    if type(optimizer) is Adafactor:
        optimizer.__class__ = ShardedAdafactor
    return optimizer


@contextlib.contextmanager
def plain_class(module: torch.nn.Module):
    """While inside, `module` has its own class again instead of FSDP2's `FSDP<class>` subclass of it."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_class = type(module)
    if not issubclass(fsdp_class, FSDPModule):
        yield module
        return
    module.__class__ = next(cls for cls in fsdp_class.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield module
    finally:
        module.__class__ = fsdp_class


def end_distributed():
    """Destroy the process group (at exit, registered by `enable_fsdp_on_cpu`): with FSDP2 on gloo, a process that
    exits without it hangs in the interpreter's shutdown after the script has finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
