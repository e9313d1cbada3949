"""
FSDP (PyTorch FSDP2, `fully_shard`) for the two training scripts, on GPUs and on CPU over gloo.

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
  `ShardedAdafactor` creates those states as DTensors laid out like the gradient, so the same update runs on the
  shards, with DTensor doing the cross-process reductions (row/column means, update RMS).

At exit the process group is destroyed (`end_distributed`): without it a CPU FSDP2 process hangs once its script
is done. Saving: `fully_shard` gives each wrapped module a new class (`FSDPOmniFusionForCausalLM`, defined in torch), and
`save_pretrained` would ship torch's FSDP files as the folder's remote code; `plain_class` restores the model's own
class while it saves.
"""

import atexit
import contextlib
import logging

import torch
from transformers.optimization import Adafactor


logger = logging.getLogger(__name__)


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
    logger.info("FSDP2 on CPU over %s: %d processes, the model sharded across them.", state.backend,
                state.num_processes)


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
    transformers' `Adafactor`, its update unchanged, for parameters that FSDP2 shards (DTensor): the factored second
    moments (a row and a column vector per matrix) are created as DTensors laid out like the gradient (the row vector
    sharded as the gradient's rows, the column vector replicated when the rows are what is sharded), so every step's
    arithmetic runs on DTensors and the reductions over sharded dimensions are gathered across processes.
    Parameters that are plain tensors are left to `Adafactor` as they are.
    """

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, zeros

        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                state = self.state[param]
                if grad is None or state or not isinstance(grad, DTensor):
                    continue
                factored, use_first_moment = self._get_options(group, grad.shape)
                state["step"] = 0
                state["RMS"] = 0
                if use_first_moment:
                    state["exp_avg"] = torch.zeros_like(grad)
                if not factored:
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    continue
                ndim, shape = grad.ndim, tuple(grad.shape)
                for name, dropped in (("exp_avg_sq_row", ndim - 1), ("exp_avg_sq_col", ndim - 2)):
                    state[name] = zeros(
                        shape[:dropped] + shape[dropped + 1 :],
                        dtype=torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype,
                        device_mesh=grad.device_mesh,
                        placements=_shard_placements(grad.placements, ndim, dropped),
                    )
        return super().step(closure)


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
    exits without it hangs in the interpreter's shutdown after the script has finished (seen: until killed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
