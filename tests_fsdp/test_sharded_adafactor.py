"""`ShardedAdafactor` on FSDP2-style sharded (DTensor) parameters takes the same steps as transformers' Adafactor on
the whole tensors: 2 processes over gloo, uneven shards (5 rows over 2 processes), 1-D to 3-D parameters."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.optimization import Adafactor

from modeling_omnifusion.training.fsdp import ShardedAdafactor

SHAPES = [(5, 3), (4, 6), (7,), (3, 2, 4), (1, 8)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, port: int, options: dict, results: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=generator) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(3)]
    plain = [torch.nn.Parameter(tensor.clone()) for tensor in full]
    sharded = [torch.nn.Parameter(distribute_tensor(tensor.clone(), mesh, [Shard(0)])) for tensor in full]
    reference, optimizer = Adafactor(plain, **options), ShardedAdafactor(sharded, **options)
    for step_grads in grads:
        for param, grad in zip(plain, step_grads):
            param.grad = grad.clone()
        for param, grad in zip(sharded, step_grads):
            param.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        reference.step()
        optimizer.step()
    gathered = [param.detach().full_tensor() for param in sharded]
    local = [param.to_local().numel() for param in sharded]
    if rank == 0:
        torch.save(([param.detach() for param in plain], gathered, full, local), results)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 1e-2, "scale_parameter": False, "relative_step": False},  # what the Trainer's --optim adafactor uses
        {"lr": None, "scale_parameter": True, "relative_step": True, "beta1": 0.9, "weight_decay": 0.1},
    ],
)
def test_sharded_adafactor_steps_like_adafactor_on_whole_tensors(options, tmp_path):
    context = mp.get_context("spawn")
    results, port = str(tmp_path / "results.pt"), free_port()
    processes = [context.Process(target=run_rank, args=(rank, port, options, results)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0, 0]
    plain, sharded, start, local = torch.load(results)
    # rank 0 holds 3 of 5 rows, 2 of 4, 4 of 7, 2 of 3 and the only row of (1, 8) (rank 1 holds none of it)
    assert local == [3 * 3, 2 * 6, 4, 2 * 2 * 4, 8]
    for shape, expected, got, before in zip(SHAPES, plain, sharded, start):
        assert not torch.equal(expected, before), shape  # the steps moved it
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"shape {shape}")
