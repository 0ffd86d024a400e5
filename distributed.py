"""One run on several processes (torchrun): the process group, each process's share of a list of images, and what
the shares computed brought back together in image order.

    torchrun --standalone --nproc_per_node N trainer.py <the flags of a single-process run>

torchrun starts N copies of the program and tells each its place in the environment (RANK, LOCAL_RANK, WORLD_SIZE);
``Ranks.from_environment`` joins them in one process group: NCCL on CUDA (each process on the GPU of its LOCAL_RANK),
gloo on the CPU. Objects (rows of metrics, scores, the resume state) travel pickled over gloo, also when tensors go
over NCCL. Without torchrun (or with one process) there is no process group: ``Ranks()``, where every method is the
single-process code -- ``share`` is the whole list, ``gather``, ``from_first`` and ``together`` just run the work --
and nothing is exchanged.

Every exchange carries errors: a rank whose work raised sends the error instead of its result, and then every rank
raises the error of the lowest rank that had one (its own object there, a copy elsewhere, with the original
traceback as a note). So the ranks stop together at the same exchange, instead of one waiting forever for another
that has stopped. The exchanges:

- ``share(items)``: this rank's contiguous share (the first ranks take one more when the count does not divide: 4
  on 3 ranks is 2 + 1 + 1; a rank may get none); ``gather(work)``: ``work()`` (the list for this rank's share) on
  every rank, the lists concatenated in rank order -- the whole list in the order of ``items``, on every rank;
- ``from_first(work, ...)``: rank 0 alone runs it (it owns the run folder), every rank gets its result;
- ``together(work, ...)``: every rank runs it; an error of any rank stops all (the boundary of a step);
- ``sum_with_grad(tensor)``: the sum over ranks, through which gradients flow back to every rank's part.
"""
from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")
RESTART_VARIABLE = "TORCHELASTIC_RESTART_COUNT"  # torchrun --max-restarts: how many times it restarted the workers


class RankFailed(RuntimeError):
    """An error another rank found that cannot be rebuilt here (it does not pickle); its type and message."""


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times torchrun has restarted this run's processes (0: the first start, or no torchrun)."""
    text = environ.get(RESTART_VARIABLE, "0")
    return int(text) if text.isdigit() else 0


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return int(environ.get("WORLD_SIZE", "1") or 1) > 1


def shares(count: int, size: int) -> List[range]:
    """The positions 0..count-1 in ``size`` contiguous shares, the first ``count % size`` one longer."""
    bounds = np.cumsum([0] + [count // size + (r < count % size) for r in range(size)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class Ranks:
    """This process's place in a run: ``rank`` of ``size`` processes (``local_rank`` on its machine), and the
    exchanges between them (see the module docstring). ``Ranks()``: one process, no process group."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, backend: str = "",
                 objects: Optional[object] = None) -> None:
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend
        self._objects = objects  # the gloo group objects travel over (None: the default group, itself gloo)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Ranks":
        """The process group torchrun's environment describes (NCCL when CUDA is present, else gloo), or ``Ranks()``
        without torchrun or with one process."""
        if not launched_by_torchrun(environ):
            return cls()
        rank, size, local_rank = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        return cls(rank, size, local_rank, backend, dist.new_group(backend="gloo") if backend == "nccl" else None)

    @property
    def active(self) -> bool:
        """Whether there is a process group (several processes)."""
        return bool(self.backend)

    @property
    def first(self) -> bool:
        """Whether this is rank 0: the process that owns the run folder and writes everything."""
        return self.rank == 0

    def device(self) -> torch.device:
        """The device of this rank under torchrun: the GPU of its LOCAL_RANK with NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size}, backend={self.backend or 'none'})"

    # ---- shares of a list

    def share(self, items: Sequence[T]) -> List[T]:
        """This rank's contiguous share of ``items`` (all of them in one process)."""
        items = list(items)
        return items if not self.active else [items[i] for i in shares(len(items), self.size)[self.rank]]

    def gather(self, work: Callable[[], List[T]]) -> List[T]:
        """``work()`` on every rank (a list: what this rank computed for its ``share``), every rank's list
        concatenated in rank order, on every rank; an error of any rank is raised on all."""
        if not self.active:
            return work()
        parts = self._exchange(self._attempt(work))
        return [item for part in parts for item in part]

    # ---- steps

    def from_first(self, work: Callable[..., T], *args, **kwargs) -> T:
        """``work(*args, **kwargs)`` on rank 0 alone; its result (or its error) on every rank."""
        if not self.active:
            return work(*args, **kwargs)
        own = self._attempt(work, *args, **kwargs) if self.first else None
        box = [self._sendable(own) if self.first else None]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return self._values(box, own)[0]

    def together(self, work: Callable[..., T], *args, **kwargs) -> T:
        """``work(*args, **kwargs)`` on every rank, this rank's result; an error of any rank is raised on all (the
        boundary of a step: no rank goes on to the next one alone)."""
        if not self.active:
            return work(*args, **kwargs)
        own = self._attempt(work, *args, **kwargs)
        self._exchange(own, send_value=False)
        return own[1]

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self._objects)

    def exit(self, message: str, code: int = 2) -> None:
        """Exit with ``code``, rank 0 printing ``message`` (to stderr). On an error every rank waits until it is
        printed: torchrun stops the other processes as soon as one has exited (and itself returns 1, whatever their
        codes). Ctrl-C (130) waits for nothing: torchrun is stopping every process."""
        if self.first:
            print(message, file=sys.stderr, flush=True)
        if code != 130:
            self.barrier()
        sys.exit(code)

    def sum_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks, the same on every rank, differentiable (``SumOverRanks``)."""
        return SumOverRanks.apply(tensor) if self.active else tensor

    def close(self) -> None:
        """Leave the process group, once every rank has come here (a rank that tore its connections down while
        another still used them could make that one abort); after a rank's death the barrier fails at once."""
        if self.active and dist.is_initialized():
            try:
                dist.barrier(group=self._objects)
            except RuntimeError:
                pass
            dist.destroy_process_group()

    # ---- the exchange of results and errors

    def _attempt(self, work: Callable[..., T], *args, **kwargs) -> Tuple[bool, object]:
        try:
            return True, work(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every error goes to every rank, which raise it
            return False, err

    def _sendable(self, outcome: Tuple[bool, object]) -> Tuple[bool, object]:
        ok, value = outcome
        return (True, value) if ok else (False, _portable(value, self.rank))

    def _exchange(self, own: Tuple[bool, object], send_value: bool = True) -> List[object]:
        """Every rank's value, in rank order (None for each without ``send_value``), from this rank's ``own``
        outcome (ok, value or its error) and every other rank's; or the lowest rank's error, raised."""
        sent = self._sendable(own) if send_value or not own[0] else (True, None)
        outcomes: List[object] = [None] * self.size
        dist.all_gather_object(outcomes, sent, group=self._objects)
        return self._values(outcomes, own)

    def _values(self, outcomes: List[Tuple[bool, object]], own: Optional[Tuple[bool, object]]) -> List[object]:
        """The values of ``outcomes`` (one per rank, or rank 0's alone); when one failed, raise the error of the
        lowest rank that failed: this rank's own object when it is that rank, else the copy it sent."""
        failed = next((r for r, (ok, _) in enumerate(outcomes) if not ok), None)
        if failed is None:
            return [value for _, value in outcomes]
        if failed == self.rank and own is not None and not own[0]:
            raise own[1]
        raise _rebuilt(outcomes[failed][1])


class SumOverRanks(torch.autograd.Function):
    """S = sum over ranks of each rank's ``tensor`` s_r. Every rank computes the same loss L(S) from it, and
    DistributedDataParallel averages the ranks' gradients; so the backward also sums over ranks: each rank's s_r
    gets N dL/dS, and the average over the N ranks of N dL/dS ds_r/dtheta is dL/dtheta, the gradient of the loss
    of the whole batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _portable(err: BaseException, rank: int) -> Tuple[Optional[bytes], str, str, int]:
    """An error as it travels: (its pickle, or None when it does not pickle), its type and message, its traceback."""
    try:
        data: Optional[bytes] = pickle.dumps(err)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - an error that does not survive pickling travels as its text
        data = None
    return data, f"{type(err).__name__}: {err}", "".join(traceback.format_exception(err)), rank


def _rebuilt(sent: Tuple[Optional[bytes], str, str, int]) -> BaseException:
    data, text, trace, rank = sent
    err = pickle.loads(data) if data is not None else RankFailed(f"rank {rank}: {text}")
    err.add_note(f"raised on rank {rank}:\n{trace}")
    return err
