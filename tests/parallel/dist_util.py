"""Run a function on N local gloo ranks (torch.multiprocessing) and collect results."""
import io
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()  # bytes, not shared-memory tensors: this process exits first
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, buf.getvalue()))
    except Exception as e:  # report, don't hang the other ranks' test
        import traceback

        queue.put((rank, RuntimeError(f"rank {rank}: {e}\n{traceback.format_exc()}")))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args):
    """fn(rank, world, *args) on `world` gloo processes -> [result of rank 0, 1, ...]."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    for r in range(world):
        if isinstance(results[r], Exception):
            raise results[r]
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]
