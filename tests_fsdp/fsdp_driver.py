"""Stage 2 (`modeling_omnifusion.training.stage2`) under torchrun, recording after training how each process holds
the model.

    torchrun --nproc_per_node 2 tests_fsdp/fsdp_driver.py <report folder> <stage-2 flags>

Writes `<report folder>/rank<N>.json`: the accelerator's distributed type, whether the Trainer wrapped the model in
DDP, the steps it trained, and for every parameter whether it is a DTensor and how many of its elements this process
holds.
"""

import faulthandler
import json
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from modeling_omnifusion.training import stage2

faulthandler.dump_traceback_later(300, exit=True)  # a hang shows every process's stack, before the test's timeout
torch.set_num_threads(1)  # 2 processes on the 2 cores, and the same arithmetic in every run
report_dir = sys.argv[1]
train_or_resume = stage2.train_or_resume


def train_and_report(trainer):
    steps = []  # the global step at each training step this process ran (a resumed run starts after its checkpoint)
    training_step = trainer.training_step

    def counted_training_step(*args, **kwargs):
        steps.append(trainer.state.global_step)
        return training_step(*args, **kwargs)

    trainer.training_step = counted_training_step
    train_or_resume(trainer)
    parameters = {}
    for name, parameter in trainer.model.named_parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        parameters[name] = {
            "dtensor": isinstance(parameter, DTensor),
            "local": local.numel(),
            "global": parameter.numel(),
            "shape": list(parameter.shape),
            "trainable": parameter.requires_grad,
        }
    report = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "model_class": type(trainer.model).__name__,
        "optimizer_class": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,
        "trained_steps": sorted(set(steps)),
        "parameters": parameters,
    }
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump(report, file)


stage2.train_or_resume = train_and_report
stage2.train(sys.argv[2:])
