"""Several processes, one run: data parallelism with Accelerate's process state and collectives.

Start a run on N processes with Accelerate's launcher (it sets RANK / WORLD_SIZE / LOCAL_RANK):

    accelerate launch --multi_gpu --num_processes N -m simu_core unlearn ...   # or: simu_core unlearn --processes N

Every process holds the whole model and draws the same seeded global batches; `Group.shard` hands
each its rows (Accelerate's `split_between_processes`). Each process weights its loss terms by its
share of the global batch (answer tokens for the token-mean terms, rows for per-sequence terms), so
the *sum* of the processes' gradients is the gradient of the one-process objective; `Group.reduce_sum`
sums them with `accelerate.utils.reduce` (one collective per step over one flat buffer).

Why not `Accelerator.prepare(model)` (DistributedDataParallel)? DDP's reducer hooks the module's own
parameters and reduces full-size gradients. SIMU trains the selected neuron slices through compact
leaves outside the module (`optim.SliceLeaves`), and Sophia's GNB / Hutchinson estimates come from
`torch.autograd.grad`, which DDP does not see. Reducing the compact gradients ourselves keeps the
communication, like the optimiser state, proportional to the mask, and entries outside the mask are
never touched: they stay bit-identical to the original on every process.

Every method can instead shard the working copy (`--shard`, `shard_model`): PyTorch's FSDP2 splits
every weight over the processes, and for the methods that train whole tensors also their gradients
and optimiser moments; FSDP reduces those gradients in the backward. SIMU's compact leaves stay
outside FSDP, whole on every process: their gradients are summed as above, and each step writes the
updated slices into the part of each weight this process holds (`write_slices`). The run is gathered
into a plain model at the end.

Only the main process (rank 0) writes run folders. On one process (no launcher) `current()` returns
a group of one whose shard is the whole batch and whose reductions are the identity (accelerate is
not even imported), so single-process runs are unchanged bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from simu_core.errors import SimuError
from simu_core.models import pick_device

Batch = dict[str, torch.Tensor]


def launched_world_size() -> int:
    """Number of processes a launcher (accelerate launch / torchrun) started, from WORLD_SIZE (1 if none)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class Share:
    """This process's part of one global batch: its rows, and its share of the global answer tokens
    and rows (the weights of the token-mean and per-sequence loss terms; 1.0 on one process).
    `empty` marks a process that got no row (a short last batch): it runs one row with weight 0."""

    batch: Batch
    token_weight: float
    row_weight: float
    empty: bool = False


def answer_tokens(batch: Batch) -> int:
    """Answer tokens of a collated batch (the positions its mean NLL averages over)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def share_of(batch: Batch, local: Batch) -> Share:
    """The `Share` of `local`, some rows of the global `batch`: weights are its fractions of the global
    answer tokens and rows (they sum to 1 over a partition of the rows). No rows: one row at weight 0."""
    if local["input_ids"].shape[0] == 0:  # a short last batch: keep a graph, contribute nothing
        return Share({k: v[:1] for k, v in batch.items()}, 0.0, 0.0, empty=True)
    tokens = answer_tokens(local) / max(1, answer_tokens(batch))
    return Share(local, tokens, local["input_ids"].shape[0] / batch["input_ids"].shape[0])


class Group:
    """The processes of one run (a group of one without a launcher).

    `rank` / `world` / `device` as Accelerate's `PartialState` sets them up (gloo on CPU, NCCL on
    CUDA); `is_main` is rank 0.
    """

    def __init__(self, prefer_device: str | None = None) -> None:
        self.world = launched_world_size()
        self._state = None
        if self.world == 1:
            self.rank, self.device = 0, pick_device(prefer_device)
            return
        from accelerate import PartialState

        cpu = prefer_device == "cpu" or (prefer_device in (None, "auto") and not torch.cuda.is_available())
        self._state = PartialState(cpu=cpu)
        self.rank = self._state.process_index
        device = self._state.device
        self.device = torch.device("cpu") if device.type == "cpu" else device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return None if self._state is None else self._state.backend

    def shard(self, batch: Batch | None) -> Share | None:
        """This process's rows of `batch` (contiguous, sizes differ by at most one) and their weights."""
        if batch is None:
            return None
        if self.world == 1:
            return Share(batch, 1.0, 1.0)
        with self._state.split_between_processes(dict(batch)) as part:  # it replaces a dict's values in place
            return share_of(batch, dict(part))

    def reduce_sum(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Element-wise sums over the processes of each tensor (None stays None), in one collective.

        Every process must pass tensors of the same shapes in the same order (None in the same places).
        """
        if self.world == 1:
            return list(tensors)
        from accelerate.utils import reduce

        present = [t for t in tensors if t is not None]
        if not present:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(present[0].dtype) for t in present])
        total = reduce(flat, reduction="sum")
        out, offset = [], 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            out.append(total[offset : offset + t.numel()].view(t.shape).to(t.dtype))
            offset += t.numel()
        return out

    def reduce_mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise means over the processes (e.g. curvature estimates: each is unbiased, so is their mean)."""
        if self.world == 1:
            return list(tensors)
        return [t / self.world for t in self.reduce_sum(tensors)]

    def any(self, flag: bool) -> bool:
        """True when `flag` is set on any process (a collective: every process must call it)."""
        if self.world == 1:
            return flag
        return bool(self.reduce_sum([torch.tensor([float(flag)], device=self.device)])[0].item() > 0)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated in rank order (Accelerate's `gather_object`)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def split(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous part of `items` (Accelerate's `split_between_processes`)."""
        if self.world == 1:
            return list(items)
        with self._state.split_between_processes(list(items)) as part:
            return list(part)

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


_GROUPS: dict[str | None, Group] = {}


def current(prefer_device: str | None = None) -> Group:
    """The group of this process (made once per process and device preference)."""
    if prefer_device not in _GROUPS:
        _GROUPS[prefer_device] = Group(prefer_device)
    return _GROUPS[prefer_device]


def close(wait: bool = True) -> None:
    """End this process's part of a multi-process run: wait for the others (`wait`; not after an error, when
    they may never arrive), then tear the process group down. Left to the interpreter's exit, gloo's worker
    threads can abort the process ("terminate called without an active exception") after a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _GROUPS.clear()


def check_batch_sizes(group: Group, *sizes: int) -> None:
    """SimuError when a batch has fewer rows than there are processes (some would never get data)."""
    small = [s for s in sizes if s < group.world]
    if small:
        raise SimuError(
            f"batch size {min(small)} is smaller than the {group.world} processes: every process needs at least "
            f"one row. Raise --batch-size / --retain-batch-size to >= {group.world} or launch fewer processes."
        )


# --------------------------------------------------------------------------------------------
# Sharding (FSDP2)
# --------------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, group: Group) -> torch.nn.Module:
    """Shard `model` over the group's processes with PyTorch's FSDP2 (`fully_shard`), in place.

    Each decoder block (the classes the model lists in `_no_split_modules`) becomes one FSDP unit, the
    rest (embeddings, final norm, head, tied or not) the root's: a process keeps 1/world of every
    parameter, its gradient and the optimiser state, and gathers one block's weights at a time for
    the forward and the backward. Parameters become `DTensor`s (new `nn.Parameter` objects: build the
    trainable set afterwards). FSDP *averages* the gradients over the processes, while each process
    already weights its loss by its share of the global batch (see `Share`), so that their sum is the
    one-process gradient: multiply each process's loss by the world size before `backward()`. (FSDP's
    divide factor 1 would say the same, but gloo has no PREMUL_SUM reduction.)
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(group.device.type, (group.world,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a shard of a parameter, gradient or state of a sharded model)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` (the tensor itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def sum_over_shards(t: torch.Tensor) -> float:
    """The sum of all entries of `t` over every process's shard, as a float (a collective when sharded:
    a DTensor's `.sum()` is a pending partial sum, which `float()` alone would read as this process's)."""
    s = t.sum()
    return float(s.full_tensor() if is_sharded(s) else s)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` with every process's shard gathered (a collective when sharded; `t` itself otherwise)."""
    return t.full_tensor() if is_sharded(t) else t


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """[start, stop): the rows (dim 0) of `t` that this process holds (all of them when not sharded).

    FSDP2 shards dim 0 as `torch.chunk` does: pieces of ceil(rows / world) rows, in rank order, the
    last ones shorter or empty."""
    rows = t.shape[0]
    if not is_sharded(t):
        return 0, rows
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise SimuError(f"expected a tensor sharded on dim 0 by FSDP, got placements {t.placements}.")
    mesh = t.device_mesh
    piece = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * piece, rows)
    stop = min(start + piece, rows)
    if t.to_local().shape[0] != stop - start:  # FSDP's layout changed: writing would corrupt weights
        raise SimuError(f"this process holds {t.to_local().shape[0]} rows of {rows}, expected {stop - start}.")
    return start, stop


@torch.no_grad()
def write_slices(param: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """`param[..., index, ...] = values` along `dim` (`index` long [n], `values` the compact slices),
    other entries untouched. For a sharded parameter only this process's rows are written: the rows
    it holds among `index` when `dim` is 0, else its rows of `values`."""
    values = values.to(param.dtype)
    if not is_sharded(param):
        param.data.index_copy_(dim, index, values)
        return
    start, stop = local_rows(param)
    part = param.data.to_local()
    if dim == 0:
        held = (index >= start) & (index < stop)
        part.index_copy_(0, index[held] - start, values[held])
    else:
        part.index_copy_(dim, index, values[start:stop])


def plain_copy(like: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A plain, frozen float32 copy of `like` on `device` (a sharded run's values are written into it)."""
    import copy

    plain = copy.deepcopy(like).to(device=device, dtype=torch.float32).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain
