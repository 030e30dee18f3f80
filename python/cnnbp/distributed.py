"""Data-parallel training on MPI (mpi4py), with PyTorch DistributedDataParallel's semantics.

    mpiexec -n 4 cnnbp train --distributed          # the CLI: the global batch split 4 ways

    from cnnbp import data, distributed, nn, optim
    world = distributed.init()                      # rank, size; a world of one without MPI
    model = distributed.DistributedDataParallel(build())   # rank 0's weights on every rank
    sampler = data.DistributedSampler(len(y), world.size, world.rank, seed=0)
    loader = data.DataLoader(x, y, batch_size=B // world.size, sampler=sampler)
    for xb, yb in loader:
        loss = model.train_step(xb, yb, loss_fn, opt)  # gradients averaged: one Allreduce
    total = world.allreduce_sum([loss_sum, count])    # metrics, summed over the ranks

Every rank runs the same model on its share of each global batch; after the backward the
gradients are packed into one flat buffer (cnnbp.nn.pack_gradients, C++), summed over the
ranks by one MPI Allreduce, divided by the number of ranks and unpacked, and every rank
takes the same optimizer step. With the DistributedSampler each rank's share of a batch has
the same size, so the mean of the ranks' mean-loss gradients is the gradient of the global
batch's mean loss: N ranks train as one process does, up to the order of the sums.

BatchNorm2d normalizes with each rank's own batch statistics, as torch's DDP does by default
(no SyncBatchNorm): with N ranks a BatchNorm layer sees batches N times smaller than one
process does, so the losses and weights differ from a single process's. The running
statistics are rank 0's: broadcast when the wrapper is made and by sync_buffers() (before
an evaluation and a save), as torch's broadcast_buffers gives every rank rank 0's.

An exception on one rank would leave the others waiting in their next collective call:
init() installs an excepthook that prints "[distributed] rank R of N failed: ..." and calls
MPI_Abort, which ends every rank with a non-zero status.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from . import nn

INSTALL_HINT = (
    'install the mpi extra (pip install "cnnbp[mpi]": mpi4py and the mpich wheel, which '
    "brings mpiexec) and launch with mpiexec, e.g. mpiexec -n 2 cnnbp train --distributed"
)


@dataclass
class World:
    """The processes training together: this one's rank in 0..size-1, and the MPI
    communicator (None in a world of one without MPI)."""

    rank: int = 0
    size: int = 1
    comm: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, draws and saves."""
        return self.rank == 0

    def allreduce_sum(self, values):
        """The elementwise sum over the ranks of `values` (float64), the same on every rank."""
        values = np.array(values, dtype=np.float64)
        if self.comm is not None and self.size > 1:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
        return values

    def broadcast(self, array):
        """Rank 0's `array` into every rank's (in place)."""
        if self.comm is not None and self.size > 1:
            self.comm.Bcast(array, root=0)
        return array

    def barrier(self):
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()

    def abort(self, code=1):
        """End every rank (MPI_Abort); in a world of one, this process."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            # MPI_Abort tears the job down at once, and output still on its way through the
            # launcher's pipes can be lost with it (the failure message, 1 run in about 12
            # here): give the launcher a moment to pass it on first.
            time.sleep(0.5)
            self.comm.Abort(code)
        raise SystemExit(code)


_WORLD = None


def available() -> bool:
    """Whether mpi4py can be imported."""
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def init(require=False) -> World:
    """The world of processes this one belongs to (MPI_COMM_WORLD), made once.

    Without mpi4py: a world of one (rank 0, size 1), or ImportError with how to install and
    launch when `require`. With more than one rank, an uncaught exception on any rank prints
    "[distributed] rank R of N failed: ..." and aborts all of them (MPI_Abort)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError as error:
        if require:
            raise ImportError(f"[distributed] mpi4py is needed: {INSTALL_HINT}") from error
        _WORLD = World()
        return _WORLD
    comm = MPI.COMM_WORLD
    _WORLD = World(comm.Get_rank(), comm.Get_size(), comm)
    if _WORLD.size > 1:
        _install_abort_on_error(_WORLD)
    return _WORLD


def failure_message(world, error) -> str:
    return (
        f"[distributed] rank {world.rank} of {world.size} failed: {type(error).__name__}: {error}"
    )


def _install_abort_on_error(world):
    previous = sys.excepthook

    def abort_all(kind, error, tb):
        if issubclass(kind, KeyboardInterrupt):
            return previous(kind, error, tb)
        traceback.print_exception(kind, error, tb)
        print(failure_message(world, error), file=sys.stderr)
        world.abort(1)

    sys.excepthook = abort_all


class DistributedDataParallel:
    """`module` trained on every rank with gradients averaged across the ranks.

    Made on every rank: rank 0's parameters and floating buffers are broadcast to all, so
    every rank starts from the same weights. train_step(x, y, loss_fn, optimizer) is the
    module's train_step with one Allreduce of all gradients (one flat buffer) between the
    backward and the optimizer's step; it returns this rank's loss on its share of the batch
    (as torch, the loss is not reduced: sum it per epoch with World.allreduce_sum). Calls
    the module does not need (forward, backward, parameters, state_dict, ...) go to it."""

    def __init__(self, module, world=None):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"[DistributedDataParallel] module: expected a cnnbp nn module, "
                f"got {type(module).__name__}"
            )
        self.module = module
        self.world = init() if world is None else world
        self._flat = None
        if self.world.size > 1:
            flat = nn.pack_parameters(module)
            self.world.broadcast(flat)
            nn.unpack_parameters(module, flat)
            self.sync_buffers()

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    def __call__(self, x):
        return self.module(x)

    def sync_buffers(self):
        """Rank 0's floating buffers (BatchNorm2d's running statistics) on every rank."""
        if self.world.size > 1:
            flat = nn.pack_buffers(self.module)
            if flat.size:
                self.world.broadcast(flat)
                nn.unpack_buffers(self.module, flat)

    def allreduce_gradients(self):
        """Every parameter's gradient replaced by its mean over the ranks: pack, one
        Allreduce (sum) of the flat buffer, divide by the number of ranks, unpack."""
        if self.world.size == 1:
            return
        from mpi4py import MPI

        self._flat = nn.pack_gradients(self.module, self._flat)
        self.world.comm.Allreduce(MPI.IN_PLACE, self._flat, op=MPI.SUM)
        self._flat /= self._flat.dtype.type(self.world.size)
        nn.unpack_gradients(self.module, self._flat)

    def train_step(self, x, y, loss_fn, optimizer) -> float:
        """zero_grad, forward, loss, backward, allreduce_gradients, optimizer.step();
        returns this rank's loss. In a world of one, the module's own train_step."""
        if self.world.size == 1:
            return self.module.train_step(x, y, loss_fn, optimizer)
        if getattr(loss_fn, "reduction", "mean") != "mean":
            raise ValueError(
                "[DistributedDataParallel] loss: expected reduction 'mean' (the ranks' "
                f"gradients are averaged), got {getattr(loss_fn, 'reduction', None)!r}"
            )
        module = self.module
        module.zero_grad()
        loss = loss_fn(module(x), y)
        module.backward(loss_fn.backward())
        self.allreduce_gradients()
        optimizer.step()
        return loss


__all__ = ["World", "init", "available", "DistributedDataParallel", "INSTALL_HINT"]
