"""Processes and collectives: rank, world size and device; the process group (with ``dist.timeout_s``);
the few collectives the trainer uses outside DeepSpeed; a clear error when a collective times out.

    comm = Comm.setup(cfg.train, cfg.dist)      # initialises torch.distributed (and DeepSpeed's comm) once
    comm.rank, comm.world, comm.device
    comm.mean_tensor(loss); comm.mean(loss); comm.broadcast(obj); comm.barrier()
    comm.any_rank(flag); comm.max_int(signum); comm.all_objects(obj)     # host values, never the GPU

One process needs no launcher: the rendezvous variables are set here.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time

import torch

from fastclip.train.config import ConfigError


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within ``dist.timeout_s``; the message names the ranks that did not answer."""


class Comm:
    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: int, monitor=None, flags=None):
        self.rank, self.world, self.device, self.timeout_s = rank, world, device, timeout_s
        self._monitor = monitor  # a gloo group used only to find the ranks that stopped answering
        # The group that agrees on host values (signals, save failures): gloo over CPU tensors, so an
        # agreement waits for the other ranks but never for this rank's GPU. None: the default group
        # (gloo itself in a CPU run).
        self._flags = flags

    @classmethod
    def setup(cls, tc, dc) -> Comm:
        """Rank, world size and device; initialises torch.distributed once, with ``dc.timeout_s``."""
        want = tc.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
        if want == "cpu":
            # DeepSpeed moves the model to its accelerator's device and picks CUDA wherever a GPU is
            # visible (its choice is made when it is first imported): a CPU run needs its CPU accelerator.
            # (On a machine without a GPU this also spares the warning that it fell back to CPU.)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        _check_accelerator(want)
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(tc.threads or cpu_threads())
        backend = tc.backend if tc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if device.type == "cpu":
            _skip_shm_comm_op()
        timeout = datetime.timedelta(seconds=dc.timeout_s)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:  # a process group made by the caller keeps its own timeout
            deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        monitor = torch.distributed.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        flags = None
        if world > 1 and device.type != "cpu":
            flags = torch.distributed.new_group(backend="gloo", timeout=timeout)
        return cls(rank, world, device, dc.timeout_s, monitor, flags)

    # ---- collectives ---------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a scalar tensor, as a (1,) float32 tensor on the device (no host read)."""
        t = t.detach().float().reshape(1).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def mean(self, t: torch.Tensor) -> float:
        return float(self.mean_tensor(t))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a host value)."""
        return self.max_int(1 if flag else 0) > 0

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (a small int, a host value), on every rank: a CPU
        tensor on the flags group, which waits for the other ranks but not for the GPU."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([float(value)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._flags)
        return int(t.item())

    def all_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (over the flags group)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self._flags)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ---- timeouts ------------------------------------------------------------------------------
    def is_timeout(self, exc: BaseException) -> bool:
        """True for the error a collective raises when ``dist.timeout_s`` passed (gloo and NCCL)."""
        backend_error = getattr(torch.distributed, "DistBackendError", ())
        return self.world > 1 and (
            isinstance(exc, backend_error) or "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        )

    def timeout_error(self, exc: BaseException, step: int) -> DistributedTimeoutError:
        """Ask every rank to answer a monitored barrier on a separate gloo group; name those that do not."""
        who = "could not tell which rank stopped"
        if self._monitor is not None:
            wait = datetime.timedelta(seconds=max(5, min(60, self.timeout_s)))
            try:
                torch.distributed.monitored_barrier(group=self._monitor, timeout=wait, wait_all_ranks=True)
                who = "every rank answered a check afterwards: one was slower than the timeout"
            except RuntimeError as check:  # the barrier's error lists the ranks that did not arrive
                found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(check))
                if found:
                    who = f"rank(s) {found.group(1).strip()} did not respond (stopped or hung)"
                elif self.rank != 0:
                    who = "rank 0 did not answer the check (stopped or hung)"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return DistributedTimeoutError(
            f"rank {self.rank}: a collective at step {step} did not complete within dist.timeout_s="
            f"{self.timeout_s} s; {who} [{first}]"
        )


def _check_accelerator(want: str) -> None:
    """DeepSpeed places the model on its accelerator's device (``DeepSpeedEngine`` moves the module there):
    that must be the run's device, or the model and the batches end up on different devices."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()  # "cpu" or "cuda"
    if name != want:
        raise ConfigError(
            f"train.device: {want!r}, but DeepSpeed's accelerator in this process is {name!r} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}, or chosen by an earlier run in this process) "
            f"and DeepSpeed would move the model to {name}; start a new process with DS_ACCELERATOR={want} "
            "or unset"
        )


def hang_point(step: int, rank: int) -> None:
    """Test hook: FASTCLIP_TEST_HANG="step:rank" makes that rank stop answering at that step."""
    spec = os.environ.get("FASTCLIP_TEST_HANG")
    if spec and spec == f"{step}:{rank}":
        while True:
            time.sleep(60)


MAX_DEFAULT_THREADS = 8


def cpu_threads() -> int:
    """Default intra-op threads per process on CPU: the cores this process may use (its affinity mask),
    shared by this node's processes, between 1 and 8. Fixed for a machine, never the load: the
    thread count changes the order of float reductions and so the numbers of a run (300 demo steps:
    top-1 0.467 with 1 thread, 0.451 with 2), which must not depend on how busy the machine is.
    On a machine busy with other jobs set ``train.threads`` lower (oversubscribed OpenMP threads spin
    against each other)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_THREADS, cores // local))


def _skip_shm_comm_op() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op for CPU at start-up (~25-50 s on a cold cache);
    the training collectives here go through gloo, so mark the op unavailable instead.

    Targets DeepSpeed 0.19.8: ``deepspeed.ops.__compatible_ops__`` is the table its CPU accelerator
    consults before building ``deepspeed_shm_comm``."""
    import deepspeed.ops as ds_ops

    table = getattr(ds_ops, "__compatible_ops__", None)
    if isinstance(table, dict):  # another DeepSpeed without this table: nothing to skip
        ds_ops.__compatible_ops__ = {**table, "deepspeed_shm_comm": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
