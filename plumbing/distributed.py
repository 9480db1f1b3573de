"""
Data parallelism for train.py: every collective the training loop makes is a call
to a function of this file (process set-up, DDP/FSDP wrapping and FSDP's state gathering:
parallel.py). docs/multi-gpu.md explains the design; in short:

- One process per device (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE); without torchrun every
  function here is a no-op and train.py is one plain process.
- Each rank holds a disjoint slice of every *global* micro-batch of batch_size × world pairs,
  exactly batch_size on every rank: data.stream_batches reads past unreadable pairs on all ranks
  in step (all_ranks), so every rank keeps one data position.
  Every random draw of a micro-batch (caption dropout, the VAE's sample, t and ε) is made for the
  whole global micro-batch from the shared generator and sliced (Share.keep), so N ranks with
  --batch_size B compute exactly what one process with --batch_size N·B computes.
- The policy is replicated (DDP) or sharded (--fsdp, FSDP2); the frozen reference is never
  wrapped. With --global_contrast the RPO matrix spans the global micro-batch (Share.everyone).
- Rank 0 alone logs and writes files; checkpoints hold full, single-device state, so a run
  resumes on any number of ranks, with or without FSDP.
"""
import torch
import torch.distributed as dist


def active():
    return dist.is_available() and dist.is_initialized()


class Share:
    """This process's pairs [offset, offset + n) of a global micro-batch of total = n × world pairs
    (data.stream_batches gives every rank exactly n = --batch_size pairs); one process: offset 0,
    n = total.

    keep(x): x was drawn for the whole global micro-batch, (total, ...) rows, or with pairs=True
      [all winners; all losers] (2·total, ...) rows: this process's rows of it, in the same layout.
    everyone(*xs): with --global_contrast, the per-pair tensors of every rank concatenated in
      rank order (gather_rows, with autograd); otherwise xs unchanged."""

    def __init__(self, n, rank=0, world=1, global_contrast=False):
        self.n, self.global_contrast = n, global_contrast
        self.offset, self.total = rank * n, world * n

    def keep(self, x, pairs=False):
        mine = slice(self.offset, self.offset + self.n)
        if not pairs:
            return x[mine]
        return torch.cat([x[mine], x[self.total + self.offset:self.total + self.offset + self.n]])

    def everyone(self, *xs):
        if not self.global_contrast:
            return xs
        return gather_rows(torch.stack(xs, dim=1)).unbind(1)


def all_ranks(flag, device):
    """True when `flag` holds on every rank (all_reduce MIN): decisions that change which
    collectives run next (skip a step, stop, read on for a full batch) must be the same on all ranks."""
    if not active():
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sync_device():
    """Where all_ranks runs outside the loop (no model at hand: the run folder's checks, the
    finite-weights check before a save): this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def largest(value, device):
    """The largest of every rank's integer `value` (all_reduce MAX; a collective, so a barrier too):
    the signal that stops the run, the epoch of streamed data (ranks' streams can differ by a batch)."""
    if not active():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wait_for_everyone():
    """Every rank waits here until all have arrived. After rank 0 writes a checkpoint: no rank
    goes on, or exits, before it is on disk (torchrun answers one rank's exit by stopping the
    others, and would stop rank 0 while it writes)."""
    if active():
        dist.barrier()


def gather_rows(x):
    """Rows x (n, ...) of every rank, concatenated in rank order: (W·n, ...), the rows one process
    would hold for the concatenated batch (every rank holds n: data.stream_batches' batches are
    full). Autograd-aware: backward hands each rank the gradient of its *own* rows, summed over the
    ranks' graphs (a reduce-scatter). Every rank computes the same global loss L from the gathered
    rows, so rank r's parameter gradient is W · ∂L/∂(rank r's rows) · ∂rows/∂θ, and DDP's/FSDP's
    average over W ranks is exactly ∂L/∂θ."""
    import torch.distributed._functional_collectives as fc
    return fc.wait_tensor(fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))


def sum_counts(counts):
    """A dict name -> count summed over every rank (all_gather_object; a collective)."""
    every = [counts]
    if active():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, counts)
    total = {}
    for c in every:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + n
    return total


def mean_over_ranks(sums, device):
    """The log's figures as global means: every rank's sums, summed (one all_reduce a step)."""
    if not active():
        return sums
    keys, world = list(sums), dist.get_world_size()  # the same key order on every rank: the same code ran
    v = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return {k: x / world for k, x in zip(keys, v.tolist())}
