"""MultiTaskModel: one frozen AST serving many tasks, with clips of different tasks in one batch.

Each layer holds two slot pools (MLP and spatial adapters), ``W_down[S, D, R]``,
``b_down[S, R]``, ``W_up[S, R, D]``, ``b_up[S, D]``; a free pool row is zero (a zero adapter
is the identity). Heads differ in class count and run per task after pooling. A batch is
ordered by task when it is assembled (stable), so each task is one contiguous run of clips;
results come back in the caller's order. Clips of tasks with deep prompts (prompt, joint) have
a longer sequence and run as their own group per prompt count.

Execution (``backend``):

- ``segments`` (CPU, or CUDA without Triton): the shared MLP runs once over all rows and each
  task's adapters over its contiguous run of rows. A batch with a single adapter task instead
  uses the widened MLP, ``act = GELU(h [W1 | W_down] + [b1 | b_down])``: one GEMM (GELU fused)
  for fc1 and the adapter's down-projection, then ``x + act [W2 ; W_up] + b2 + b_up`` as fc2's
  GEMM (residual fused) plus the R-row K tail accumulated into the same output. The widened fc1
  lives in one buffer per layer whose first H rows *are* the backbone's fc1 (no copy of the
  backbone); the R adapter rows are rewritten when the single task changes (a few MB, under a
  lock; a batch that finds the buffer busy takes the shared path). fc2 is not concatenated
  because oneDNN needs contiguous weights and a second copy of W2 would cost 113 MB (fp32).
  GEMMs go through oneDNN with fused epilogues where available (``aat_serve.adapters.kernels.cpu``).
- ``triton`` (CUDA): the fused kernels of ``aat_serve.adapters.kernels``; ``torch`` / ``interpret``
run
  the same code path through the torch reference or Triton's interpreter (tests).

Hot swap: copy-on-write per task. Loading a task fills a fresh slot (and pool row) while the old
one keeps serving; then, under a lock, the name is switched to the new slot. A forward resolves
all its task names under that lock to immutable entries and pins their slots with a reference
count, so it runs on one consistent snapshot; a replaced slot is zeroed and freed only when the
last forward holding it finishes. A forward therefore sees a task's old weights or its new ones,
never a mix, and no forward waits for a load (a read-write lock would stall forwards during a
load, or loads behind long forwards). The price is one spare slot beyond ``max_tasks``.

Dtypes: ``float32``, or ``bfloat16`` for the GEMMs (block weights, adapter pools, GEMM and
attention inputs) with fp32 accumulation. The residual stream, LayerNorms, embeddings, prompts
and heads stay fp32 in both modes: bf16 rounding of the stream itself accounted for about a
third of the bf16-vs-fp32 logit error for ~2 % of the time (docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST, Block, drop_prompts, insert_prompts
from aat_serve.adapters.bundle import Manifest, TaskBundle
from aat_serve.adapters.errors import BundleError, ConfigError, SlotsFullError, UnknownTaskError
from aat_serve.adapters.kernels import cpu
from aat_serve.adapters.kernels.dispatch import mlp_adapter, triton_available
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights, segments
from aat_serve.adapters.methods import get_method

BACKENDS = ("auto", "segments", "triton", "interpret", "torch")
_SLOT_WAIT_S = 60.0


@dataclass(frozen=True)
class TaskInfo:
    """A resident task: its slot, bundle version and manifest."""

    name: str
    slot: int
    version: str
    method: str
    num_classes: int
    manifest: Manifest


@dataclass(frozen=True)
class _Entry:
    """Everything a forward needs about one loaded task; never mutated after publication."""

    info: TaskInfo
    row: int  # pool row, -1 for tasks without adapters
    gen: int  # unique per load, keys the widened buffers
    mlp: bool
    spatial: bool
    head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # LN w, b; fc w, b
    head_eps: float
    prompts: torch.Tensor | None  # (depth, P, D)

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[1]


@dataclass(frozen=True)
class _Pools:
    mlp: tuple[AdapterPool, ...]
    spatial: tuple[AdapterPool, ...]

    @property
    def rows(self) -> int:
        return self.mlp[0].slots if self.mlp else 0


@dataclass
class _Group:
    """Clips sharing one sequence length, ordered by task; ``clips`` index the caller's batch."""

    clips: list[int]
    entries: list[_Entry | None]
    mlp_segs: list[tuple[int, int, int]]  # (first clip, end clip, pool row)
    spatial_segs: list[tuple[int, int, int]]
    widened: _Entry | None  # the single adapter task when the widened MLP applies


class _Widened:
    """Per-layer fc1 widened by one task's MLP adapter (``segments`` path).

    ``w1[i]`` is ``[W1 ; W_down[row].T]`` ``(H + R, D)`` and ``b1[i]`` ``[b1 | b_down[row]]``; the
    first H rows *are* the backbone's ``fc1`` (its parameters are views into the buffers), so
    widening costs R rows per layer, not a copy of the MLP.
    """

    def __init__(self, backbone: AST, rank: int) -> None:
        self.lock = threading.Lock()
        self.gen = -1
        self.w1: list[torch.Tensor] = []
        self.b1: list[torch.Tensor] = []
        for blk in backbone.blocks:
            fc1 = blk.mlp.fc1
            hid, d = fc1.weight.shape
            kw = dict(dtype=fc1.weight.dtype, device=fc1.weight.device)
            w1 = torch.zeros(hid + rank, d, **kw)
            b1 = torch.zeros(hid + rank, **kw)
            with torch.no_grad():
                w1[:hid].copy_(fc1.weight)
                b1[:hid].copy_(fc1.bias)
            fc1.weight.data = w1[:hid]
            fc1.bias.data = b1[:hid]
            self.w1.append(w1)
            self.b1.append(b1)

    def nbytes_extra(self, rank: int) -> int:
        """Bytes of the adapter rows (the shared rows belong to the backbone)."""
        return sum(rank * (w.shape[1] + 1) * w.element_size() for w in self.w1)

    def fill(self, pools: _Pools, entry: _Entry) -> None:
        """Write ``entry``'s down-projections into the adapter rows (caller holds ``lock``)."""
        if self.gen == entry.gen:
            return
        self.gen = -1  # invalid while half-written
        with torch.no_grad():
            for i, (w1, b1) in enumerate(zip(self.w1, self.b1, strict=True)):
                pool, r = pools.mlp[i], entry.row
                hid = w1.shape[0] - pool.rank
                w1[hid:].copy_(pool.w_down[r].t())
                b1[hid:].copy_(pool.b_down[r])
        self.gen = entry.gen


class MultiTaskModel(torch.nn.Module):
    """A frozen AST backbone plus per-layer adapter slot pools and per-task heads.

    Args:
        backbone: the shared backbone; moved to ``device`` in place, frozen, and its blocks'
            linear layers cast to ``dtype``.
        max_tasks: how many tasks may be resident at once.
        dtype: ``torch.float32`` or ``torch.bfloat16`` for the GEMM weights and adapter pools.
        device: where everything runs.
        fingerprint: the backbone's fingerprint if already known (computed otherwise, before
            any dtype change).
        bottleneck: width R of a pool row; bundles with a smaller adapter are zero-padded.
        backend: ``auto`` (``triton`` on CUDA when Triton imports, else ``segments``),
            ``segments``, ``triton``, ``interpret`` or ``torch`` (see the module docstring).
    """

    def __init__(self, backbone: AST, max_tasks: int = 64, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", fingerprint: str | None = None,
                 bottleneck: int = 192, backend: str = "auto") -> None:
        super().__init__()
        if max_tasks < 1:
            raise ConfigError(f"max_tasks must be at least 1, got {max_tasks}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if bottleneck < 1:
            raise ConfigError(f"bottleneck must be positive, got {bottleneck}")
        device = torch.device(device)
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; expected one of "
                              f"{', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "triton" if device.type == "cuda" and triton_available() else "segments"
        self.fingerprint = fingerprint if fingerprint is not None else backbone.fingerprint()
        for blk in backbone.blocks:
            if blk.mlp_adapter is not None or blk.spatial_adapter is not None:
                raise ConfigError("the backbone has adapters attached (it is part of a "
                                  "single-task model); pass a plain backbone")
        self.backbone = backbone.to(device=device).eval().requires_grad_(False)
        for blk in self.backbone.blocks:  # the GEMMs' weights; norms and embeddings stay fp32
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                lin.to(dtype)
        self.max_tasks = max_tasks
        self.dtype = dtype
        self.device = device
        self.bottleneck = bottleneck
        self.backend = backend
        cfg = backbone.cfg
        self._widened = _Widened(backbone, bottleneck) if backend == "segments" else None
        self._mlp = [MlpWeights(b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight,
                                b.mlp.fc2.bias) for b in backbone.blocks]
        self._capacity = max_tasks + 1  # one spare slot for copy-on-write replacement
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._write_lock = threading.Lock()
        self._tasks: dict[str, _Entry] = {}
        self._by_slot: dict[int, _Entry] = {}
        self._refs = [0] * self._capacity
        self._retiring: dict[int, _Entry] = {}
        self._free_slots = list(range(self._capacity))
        self._free_rows: list[int] = []
        self._gen = 0
        empty = AdapterPool.zeros(0, cfg.embed_dim, bottleneck, dtype, device)
        self._pools = _Pools((empty,) * cfg.depth, (empty,) * cfg.depth)

    # -- task management ----------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskInfo]:
        with self._lock:
            return {name: e.info for name, e in self._tasks.items()}

    def has_task(self, task: str) -> bool:
        with self._lock:
            return task in self._tasks

    def task_manifest(self, task: str) -> Manifest:
        with self._lock:
            return self._entry_locked(task).info.manifest

    def load_task(self, bundle: TaskBundle) -> int:
        """Validate ``bundle`` against the backbone and make it resident; returns its slot.

        A task of the same name is replaced atomically: forwards already running finish with
        the old weights, later ones use the new. Raises ``BackboneMismatchError``,
        ``BundleError`` or ``SlotsFullError``.
        """
        bundle.check_backbone(self.backbone, self.fingerprint)
        m = bundle.manifest
        spec = get_method(m.method)
        if not spec.exports_bundle:
            raise BundleError(f"method {m.method!r} cannot be served from a bundle")
        adapter_cfg = m.adapter_config
        has_mlp, has_spatial = spec.adapters.mlp, spec.adapters.spatial
        if (has_mlp or has_spatial) and adapter_cfg.bottleneck > self.bottleneck:
            raise BundleError(f"bundle {m.task!r} has adapters of bottleneck "
                              f"{adapter_cfg.bottleneck}, larger than this model's slot width "
                              f"{self.bottleneck}")
        t = {k: v.to(self.device) for k, v in bundle.tensors.items()}
        head = tuple(t[f"head.{n}"].float() for n in ("norm.weight", "norm.bias", "fc.weight",
                                                      "fc.bias"))
        prompts = t["prompts"].float() if "prompts" in t else None  # residual-stream tokens

        with self._write_lock:
            with self._lock:
                old = self._tasks.get(m.task)
                if old is None and len(self._tasks) >= self.max_tasks:
                    raise SlotsFullError(f"cannot load task {m.task!r}: all {self.max_tasks} "
                                         f"task slots are in use; unload a task first")
                slot = self._take_slot_locked(m.task)
                row = self._take_row_locked() if has_mlp or has_spatial else -1
                pools = self._pools
                self._gen += 1
                gen = self._gen
            info = TaskInfo(m.task, slot, m.version, m.method, m.num_classes, m)
            entry = _Entry(info, row, gen, has_mlp, has_spatial, head,
                           self.backbone.cfg.head_norm_eps, prompts)
            try:  # the row is reserved and unpublished: nobody reads it while it is written
                if row >= 0:
                    self._write_row(pools, row, t, has_mlp, has_spatial)
            except BaseException:
                with self._lock:
                    self._free_locked(entry)
                raise
            with self._lock:
                self._tasks[m.task] = entry
                self._by_slot[slot] = entry
                if old is not None:
                    self._retire_locked(old)
        return slot

    def _write_row(self, pools: _Pools, row: int, t: dict[str, torch.Tensor], has_mlp: bool,
                   has_spatial: bool) -> None:
        for i in range(self.backbone.cfg.depth):
            for kind, on, pool in (("mlp_adapter", has_mlp, pools.mlp[i]),
                                   ("spatial_adapter", has_spatial, pools.spatial[i])):
                if on:
                    p = f"blocks.{i}.{kind}."
                    pool.write(row, *(t[p + n].to(self.dtype) for n in
                                      ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))

    def unload_task(self, task: str) -> None:
        """Remove a task; forwards already holding it finish first (``UnknownTaskError``)."""
        with self._write_lock, self._lock:
            entry = self._entry_locked(task)
            del self._tasks[task]
            self._retire_locked(entry)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the backbone, the adapter pools and the heads/prompts."""
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)
        with self._lock:
            pools = self._pools
            entries = list(self._tasks.values())
        backbone = size(self.backbone.state_dict().values())
        if self._widened is not None:
            backbone += self._widened.nbytes_extra(self.bottleneck)
        pool = sum(p.nbytes() for p in (*pools.mlp, *pools.spatial))
        task = sum(size(e.head) + (size([e.prompts]) if e.prompts is not None else 0)
                   for e in entries)
        return {"backbone": backbone, "pools": pool, "tasks": task,
                "total": backbone + pool + task}

    def _entry_locked(self, task: str) -> _Entry:
        entry = self._tasks.get(task)
        if entry is None:
            known = ", ".join(sorted(self._tasks)[:20]) or "none"
            raise UnknownTaskError(f"unknown task {task!r}; loaded tasks: {known}")
        return entry

    def _take_slot_locked(self, task: str) -> int:
        # All free slots can only be missing while replaced slots are still pinned by forwards.
        if not self._free_slots and not self._slot_freed.wait_for(
                lambda: bool(self._free_slots), timeout=_SLOT_WAIT_S):
            raise SlotsFullError(f"cannot load task {task!r}: no slot was released by running "
                                 f"batches within {_SLOT_WAIT_S:.0f} s")
        return heapq.heappop(self._free_slots)

    def _take_row_locked(self) -> int:
        if self._free_rows:
            return heapq.heappop(self._free_rows)
        pools = self._pools
        old = pools.rows
        # Grow geometrically up to max_tasks rows; the spare row only when a swap needs it.
        new = min(max(1, 2 * old), self.max_tasks if old < self.max_tasks else self._capacity)
        self._pools = _Pools(tuple(p.grown(new) for p in pools.mlp),
                             tuple(p.grown(new) for p in pools.spatial))
        for r in range(old + 1, new):
            heapq.heappush(self._free_rows, r)
        return old

    def _retire_locked(self, entry: _Entry) -> None:
        slot = entry.info.slot
        if self._by_slot.get(slot) is entry:
            del self._by_slot[slot]
        if self._refs[slot]:
            self._retiring[slot] = entry
        else:
            self._free_locked(entry)

    def _free_locked(self, entry: _Entry) -> None:
        self._retiring.pop(entry.info.slot, None)
        if entry.row >= 0:
            for pool in (*self._pools.mlp, *self._pools.spatial):
                pool.clear(entry.row)
            heapq.heappush(self._free_rows, entry.row)
        heapq.heappush(self._free_slots, entry.info.slot)
        self._slot_freed.notify_all()

    def _pin(self, entries: Sequence[_Entry | None]) -> _Pools:
        for e in {id(e): e for e in entries if e is not None}.values():
            self._refs[e.info.slot] += 1
        return self._pools

    def _unpin(self, entries: Sequence[_Entry | None]) -> None:
        with self._lock:
            for e in {id(e): e for e in entries if e is not None}.values():
                slot = e.info.slot
                self._refs[slot] -= 1
                if self._refs[slot] == 0 and self._retiring.get(slot) is e:
                    self._free_locked(e)

    # -- inference -----------------------------------------------------------------------------
    def classify(self, features: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits ``(C_task,)`` (fp32, CPU) for each clip of ``features (B, T, F)`` and its task.

        All task names are resolved at once under the lock, so a concurrent hot swap never
        mixes old and new weights inside one call. Raises ``UnknownTaskError``.
        """
        self._check_features(features, len(tasks))
        with self._lock:
            entries = [self._entry_locked(t) for t in tasks]
            pools = self._pin(entries)
        try:
            return self._run(features, entries, pools)
        finally:
            self._unpin(entries)

    def forward(self, features: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        """Per-clip outputs for ``features (B, T, F)`` run with the tasks in ``slots``.

        A clip whose slot holds a task gets that task's logits ``(C,)``; a clip whose slot is
        free (or ``-1``) runs with no adapters and gets the pooled embedding ``(D,)``.
        """
        slots = [int(s) for s in slots]
        self._check_features(features, len(slots))
        for s in slots:
            if not -1 <= s < self._capacity:
                raise ConfigError(f"slot {s} is out of range; slots are -1 .. "
                                  f"{self._capacity - 1}")
        with self._lock:
            entries = [self._by_slot.get(s) for s in slots]
            pools = self._pin(entries)
        try:
            return self._run(features, entries, pools)
        finally:
            self._unpin(entries)

    def _check_features(self, features: torch.Tensor, n: int) -> None:
        f = self.backbone.cfg.num_mel_bins
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != f:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
            raise ConfigError(f"expected features of shape (batch, frames, {f}), got {shape}")
        if features.shape[0] != n:
            raise ConfigError(f"got {features.shape[0]} clips but {n} task names/slots")

    def _groups(self, entries: Sequence[_Entry | None]) -> list[_Group]:
        def key(i: int) -> tuple[int, int, int]:
            e = entries[i]
            return (0, -1, -1) if e is None else (e.num_prompts, e.row, e.info.slot)

        order = sorted(range(len(entries)), key=key)  # stable
        groups: list[_Group] = []
        for p in sorted({key(i)[0] for i in order}):
            clips = [i for i in order if key(i)[0] == p]
            ents = [entries[i] for i in clips]
            rows = [e.row if e is not None else -1 for e in ents]
            mlp = [s for s in segments(rows) if s[2] >= 0 and ents[s[0]].mlp]
            spatial = [s for s in segments(rows) if s[2] >= 0 and ents[s[0]].spatial]
            single = len(mlp) == 1 and mlp[0][:2] == (0, len(clips))
            groups.append(_Group(clips, ents, mlp, spatial, ents[0] if single else None))
        return groups

    def _run(self, features: torch.Tensor, entries: Sequence[_Entry | None],
             pools: _Pools) -> list[torch.Tensor]:
        # The dtypes are this model's own choice: a caller's autocast must not change them.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            return self._run_groups(features, entries, pools)

    def _run_groups(self, features: torch.Tensor, entries: Sequence[_Entry | None],
                    pools: _Pools) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(entries)
        if not entries:
            return []
        x = features.to(device=self.device, dtype=torch.float32)
        for g in self._groups(entries):
            idx = torch.tensor(g.clips, device=self.device)
            pooled = self._encode(x.index_select(0, idx), g, pools).float()
            for c0, c1, _ in segments([e.info.slot if e else -1 for e in g.entries]):
                e = g.entries[c0]
                seg = pooled[c0:c1]
                if e is not None:
                    lw, lb, fw, fb = e.head
                    seg = F.linear(F.layer_norm(seg, (seg.shape[-1],), lw, lb, e.head_eps), fw, fb)
                seg = seg.cpu()
                for j in range(c0, c1):
                    out[g.clips[j]] = seg[j - c0]
        return out  # type: ignore[return-value]

    def _encode(self, x: torch.Tensor, g: _Group, pools: _Pools) -> torch.Tensor:
        bb = self.backbone
        n = bb.num_prefix_tokens
        h = bb.embed(x)
        p = g.entries[0].num_prompts if g.entries[0] is not None else 0
        prompts = torch.stack([e.prompts for e in g.entries]) if p else None  # (B, L, P, D)
        widened = g.widened is not None and self._widened is not None and \
            self._widened.lock.acquire(blocking=False)
        try:
            if widened:
                self._widened.fill(pools, g.widened)
            row_slots = self._row_slots(g, h.shape[1] + p) if self.backend != "segments" else None
            for i, blk in enumerate(bb.blocks):
                if prompts is not None:
                    h = insert_prompts(h, prompts[:, i], n)
                if row_slots is None:
                    h = self._block_segments(i, blk, h, g, pools, widened)
                else:
                    h = self._block_fused(i, blk, h, pools, *row_slots)
                if prompts is not None:
                    h = drop_prompts(h, p, n)
        finally:
            if widened:
                self._widened.lock.release()
        return bb.pool(h)

    def _block_segments(self, i: int, blk: Block, x: torch.Tensor, g: _Group, pools: _Pools,
                        widened: bool) -> torch.Tensor:
        b, n, d = x.shape
        dt, heads = self.dtype, blk.attn.num_heads
        x2 = x.reshape(-1, d)  # the fp32 residual stream
        qkv = cpu.linear(blk.norm1(x2).to(dt), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, d)
        proj = blk.attn.proj
        if g.spatial_segs:
            a = cpu.linear(o, proj.weight, proj.bias)
            sp = pools.spatial[i]
            for c0, c1, r in g.spatial_segs:  # a <- a + A_s(a), per task
                a_s = a[c0 * n:c1 * n]
                t = F.gelu(torch.addmm(sp.b_down[r], a_s, sp.w_down[r]))
                a_s.addmm_(t, sp.w_up[r]).add_(sp.b_up[r])
            x2 = x2 + a
        else:
            x2 = _add_linear(x2, o, proj.weight, proj.bias)
        h = blk.norm2(x2).to(dt)
        mlp, mp = self._mlp[i], pools.mlp[i]
        if widened:  # one GEMM for fc1 and the adapter's down-projection, GELU fused
            act = cpu.linear(h, self._widened.w1[i], self._widened.b1[i], gelu=True)
            hid, r = mlp.hidden, g.widened.row
            y, inc = _add_linear_open(x2, act[:, :hid], mlp.w2, mlp.b2)
            inc.addmm_(act[:, hid:], mp.w_up[r]).add_(mp.b_up[r])  # the K tail of fc2
        else:
            act = cpu.linear(h, mlp.w1, mlp.b1, gelu=True)
            y, inc = _add_linear_open(x2, act, mlp.w2, mlp.b2)
            for c0, c1, r in g.mlp_segs:  # adapters on each task's contiguous rows
                h_s, inc_s = h[c0 * n:c1 * n], inc[c0 * n:c1 * n]
                t = F.gelu(torch.addmm(mp.b_down[r], h_s, mp.w_down[r]))
                inc_s.addmm_(t, mp.w_up[r]).add_(mp.b_up[r])
        if y is not inc:
            y = y.add_(inc)
        return y.view(b, n, d)

    def _row_slots(self, g: _Group, tokens: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-row pool rows (int32, -1 = none) for the spatial and MLP adapters."""
        def rows(segs: list[tuple[int, int, int]]) -> torch.Tensor:
            clip = torch.full((len(g.clips),), -1, dtype=torch.int32)
            for c0, c1, r in segs:
                clip[c0:c1] = r
            return clip.repeat_interleave(tokens).to(self.device)
        return (rows(g.spatial_segs) if g.spatial_segs else None), rows(g.mlp_segs)

    def _block_fused(self, i: int, blk: Block, x: torch.Tensor, pools: _Pools,
                     spatial_rows: torch.Tensor | None, mlp_rows: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        backend = "auto" if self.backend == "triton" else self.backend
        a = blk.attn(blk.norm1(x).to(self.dtype)).reshape(-1, d)
        x = x.reshape(-1, d)
        if spatial_rows is None:
            x = x + a
        else:  # the spatial adapter is the same op with no shared MLP: x + a + A_s(a)
            x = mlp_adapter(x + a, a, None, pools.spatial[i], spatial_rows, backend=backend)
        h = blk.norm2(x).to(self.dtype)
        x = mlp_adapter(x, h, self._mlp[i], pools.mlp[i], mlp_rows, backend=backend)
        return x.view(b, n, d)


def _add_linear(resid: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """``resid + x w^T + b`` in ``resid``'s dtype (fused into the GEMM when dtypes agree)."""
    if resid.dtype == x.dtype:
        return cpu.linear_add(x, w, b, resid)
    return resid + cpu.linear(x, w, b)


def _add_linear_open(resid: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, inc)``: more terms may be accumulated into ``inc`` (in the GEMM dtype); the result
    is ``y`` when ``y is inc`` (fp32: residual fused into the GEMM), else ``y + inc``."""
    if resid.dtype == x.dtype:
        y = cpu.linear_add(x, w, b, resid)
        return y, y
    return resid, cpu.linear(x, w, b)
