"""Deferred initialization: build a model on the meta device, split or shard it there, then
materialize only this rank's part, bit for bit what eager construction with the same seed gives.
Torch only.

How (record and replay, the idea of torchdistx's ``deferred_init``, written anew on a dispatch mode):

1. :func:`record_init` runs the construction on the meta device under a ``TorchDispatchMode``
   that records every op (factory ops such as ``empty`` / ``arange``, in-place initializers such
   as ``normal_`` / ``uniform_`` / ``fill_``, views, arithmetic) with its arguments. Meta tensors
   hold no data, so building costs no memory. The CPU generator's state at the start is kept.
2. The strategy splits (pipeline views), parallelizes (TP DTensors) and shards (FSDP2) the meta
   model as usual: only the local parts keep real shapes.
3. :func:`materialize` allocates the local parameters and buffers on the rank's device
   (``to_empty``) and replays the recorded ops, in order, on the **CPU**, with a private generator
   set to the recorded state: every random draw happens in the eager order, so every tensor comes
   out exactly as eager construction on CPU makes it (the eager reference of the suite, and of
   Lightning, which builds on CPU and moves). As soon as a parameter's last recorded op has run,
   this rank's slice of it (its pipeline stage's whole tensor, or its TP / FSDP2 shard) is copied
   to the device and the full CPU tensor is dropped. Peak host memory is about the largest
   tensors alive at one point of the construction (for a model built layer by layer: a few
   layers' worth), not the model.

What construction may do: anything that runs on the meta device, without reading data (no
``.item()``, no ``.tolist()``, no data-dependent branch on values), from tensors created inside
the recorded construction (or plain CPU tensors, kept as constants). A construction that reads
values raises :class:`DeferredInitError` naming the module and the fix at record time.

Randomness afterwards: eager construction advances the global CPU generator; recording does not.
:func:`materialize` moves the global generator to where eager construction would have left it,
if nothing drew from it between recording and materialization (else it leaves it alone: the
weights are still exact, later random streams, e.g. dropout, may differ from an eager run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_scale.core import device as dev
from lightning_scale.core.blocks import tied_parameter_groups

__all__ = ["DeferredInitError", "InitRecord", "MaterializeStats", "attach", "deferred", "discard_record", "is_deferred",
           "materialize",
           "record_init", "recording"]

_RECORD_ATTR = "_lightning_scale_init_record"  # set on the module built under record_init


class DeferredInitError(RuntimeError):
    """A construction that cannot be deferred, or a materialization that cannot complete."""


@dataclass(frozen=True)
class _Ref:
    """Stands for the output ``out`` of recorded op ``op`` (``op == -1``: a constant)."""

    node: int


@dataclass
class _Op:
    func: Any  # an OpOverload
    args: Any  # pytree with _Ref for tensors
    kwargs: Any
    outputs: list[int | None]  # node id of each tensor output (flattened), None for non-tensors
    random: bool  # draws random numbers (a generator argument, or torch's nondeterministic_seeded tag)
    reseed: torch.Tensor | None = None  # its generator's state, when it was (re-)seeded before this op
    written: list[int] = field(default_factory=list)  # nodes of the arguments the op writes in place
    overwrites: int | None = None  # the node it overwrites whole without reading it (normal_, fill_, ...)


@dataclass
class InitRecord:
    """What :func:`record_init` saw: the ops, which node each tensor is, and the generator state."""

    ops: list[_Op] = field(default_factory=list)
    constants: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> real tensor used as input
    aliases: dict[int, tuple[int, tuple[int, ...], tuple[int, ...], int]] = field(default_factory=dict)
    #: ^ node -> (node owning the same storage, size, stride, storage offset): a tensor no op produced
    #:   that shares an op output's storage (an ``nn.Parameter`` wrapping it)
    storage_of: dict[int, int] = field(default_factory=dict)  # node -> storage key (aliasing group)
    info: dict[int, tuple[tuple[int, ...], tuple[int, ...], int, torch.dtype]] = field(default_factory=dict)
    #: ^ meta node -> (shape, stride, storage offset, dtype), to stand in for a value not computed
    storage_bytes: dict[int, int] = field(default_factory=dict)  # storage key -> bytes
    rng_state: torch.Tensor | None = None  # CPU generator state when the construction began
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # id -> a generator passed explicitly
    targets: dict[int, list[str]] = field(default_factory=dict)  # node of each parameter/buffer -> its names
    _node_of: dict[int, int] = field(default_factory=dict)  # id(tensor) -> node
    _owner_of_storage: dict[int, int] = field(default_factory=dict)  # storage key -> first node on it
    _keep: list[torch.Tensor] = field(default_factory=list)  # tensors kept alive so ids and storages stay unique
    _next: int = 0

    def node(self, t: torch.Tensor, produced: bool = False) -> int:
        """The node of ``t``; a new one for a tensor not seen before (``produced``: an op's output)."""
        key = id(t)
        if key in self._node_of:
            return self._node_of[key]
        n = self._next
        self._next += 1
        self._node_of[key] = n
        self._keep.append(t)
        if t.device.type != "meta":  # a real tensor made outside the recording: a constant input
            self.constants[n] = t
            self.storage_of[n] = -1 - n
            return n
        storage = t.untyped_storage()._cdata
        self.storage_of[n] = storage
        self.info[n] = (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)
        self.storage_bytes[storage] = t.untyped_storage().nbytes()
        owner = self._owner_of_storage.setdefault(storage, n)
        if not produced and owner != n:
            self.aliases[n] = (owner, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        elif not produced:
            raise DeferredInitError(f"a meta tensor of shape {tuple(t.shape)} was created outside the recorded "
                                    f"construction")
        return n


def _has_generator(func: Any) -> bool:
    return any(a.name == "generator" for a in func._schema.arguments)


def _is_random(func: Any) -> bool:
    """Whether ``func`` draws from a generator: ``normal_`` (a generator argument) and also
    ``torch.randn`` / ``rand`` / ``randint`` / ``randperm`` without one (``aten.randn.default``
    has no generator argument; torch tags every such op ``nondeterministic_seeded``)."""
    return _has_generator(func) or torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())


#: The default generator is set to this state after every recorded draw, so that a re-seed inside
#: the construction is seen even when it restores the state the recording started from.
_SENTINEL = torch.Generator().manual_seed(0x5EED_5EED_5EED).get_state()


class _Recorder(TorchDispatchMode):
    def __init__(self, record: InitRecord) -> None:
        super().__init__()
        self.record = record
        self._state = record.rng_state  # meta draws do not move the generator: only a re-seed does
        torch.set_rng_state(_SENTINEL)  # (restored in recording(): the draws are replayed there)
        self._state = _SENTINEL

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _READS_VALUES:
            raise DeferredInitError(f"{func} reads tensor values")
        out = func(*args, **kwargs)
        rec = self.record
        ref = lambda x: _Ref(rec.node(x)) if isinstance(x, torch.Tensor) else x  # noqa: E731
        recorded_args, recorded_kwargs = tree_map(ref, args), tree_map(ref, kwargs)
        flat, _ = tree_flatten(out)
        outputs = [(rec._node_of.get(id(t)) if id(t) in rec._node_of else rec.node(t, produced=True))
                   if isinstance(t, torch.Tensor) else None for t in flat]
        written = [rec.node(a) for a, spec in zip(args, func._schema.arguments)
                   if isinstance(a, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write]
        overwrites = None
        if func in _OVERWRITE and args and isinstance(args[0], torch.Tensor) and _covers_storage(args[0]):
            overwrites = rec.node(args[0])
        op = _Op(func, recorded_args, recorded_kwargs, outputs, _is_random(func), None, written, overwrites)
        explicit = kwargs.get("generator")
        if op.random and explicit is None:
            state = torch.get_rng_state()
            if not torch.equal(state, _SENTINEL):  # torch.manual_seed(...) inside the construction
                op.reseed = state
            torch.set_rng_state(_SENTINEL)
        elif op.random and explicit.device.type == "cpu":
            # normal_(w, generator=g): meta draws do not advance g, so every draw would see the
            # same state. Keep the state g has at its first draw (or after a re-seed), replay its
            # draws on a private copy, in order, and leave g where eager construction leaves it.
            state = explicit.get_state()
            if not torch.equal(state, _SENTINEL):
                op.reseed = state
            explicit.set_state(_SENTINEL)
            rec.generators[id(explicit)] = explicit
        rec.ops.append(op)
        return out


class _DataOnHost(TorchFunctionMode):
    """``torch.tensor(data)`` / ``torch.as_tensor(data)`` under the meta device would lose the data
    (meta holds none): make the tensor on the host, where the recorder keeps it as a constant,
    then move it to meta through a recorded copy (replayed as a host copy)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and str(kwargs.get("device")) in ("None", "meta"):
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).to("meta")
        return func(*args, **kwargs)


_aten = torch.ops.aten
_READS_VALUES = {_aten._local_scalar_dense.default, _aten.item.default}
#: In-place ops that write every element of ``self`` without reading it: the values ``self``'s
#: storage had before do not matter (only the random draws that made them).
_OVERWRITE = {
    _aten.normal_.default, _aten.uniform_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default,
    _aten.bernoulli_.float, _aten.random_.default, getattr(_aten.random_, "from"), _aten.random_.to,
    _aten.exponential_.default, _aten.geometric_.default, _aten.cauchy_.default, _aten.log_normal_.default,
    _aten.copy_.default,
}


def _covers_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is its whole storage, contiguous from offset 0."""
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.numel() * t.element_size() == t.untyped_storage().nbytes())


@contextlib.contextmanager
def recording(owner: str = "the module") -> Iterator[InitRecord]:
    """Everything built inside is built on the meta device and recorded into the yielded
    :class:`InitRecord`; :func:`attach` it to the module that holds what was built (the way
    ``configure_model`` builds layers inside Lightning's init context). Errors name ``owner``."""
    record = InitRecord(rng_state=torch.get_rng_state())
    try:
        with torch.device("meta"), _DataOnHost(), _Recorder(record):
            yield record
    except DeferredInitError as err:
        raise DeferredInitError(
            f"{owner} cannot be built on the meta device for deferred initialization: its construction "
            f"{err} (e.g. .item(), .tolist() or a branch on a value). Give it a construction that only creates and "
            f"initializes tensors (compute data-dependent values in forward or in reset_parameters after "
            f"materialization), or build it eagerly (deferred_init=False: every rank then holds the whole model at setup)"
        ) from None
    except RuntimeError as err:
        if "meta" not in str(err).lower():
            raise
        raise DeferredInitError(
            f"{owner} cannot be built on the meta device for deferred initialization: {err}. Build it eagerly "
            f"(deferred_init=False: every rank then holds the whole model at setup), or avoid the op in its construction"
        ) from err
    # Leave the default generator where eager construction would have: replay the draws alone (on
    # scratch memory, no values kept), so later draws (a next layer, dropout, shuffling) match eager.
    _, gen, copies = _replay(record, [], lambda node, value, transfers: None)
    torch.set_rng_state(gen.get_state())
    for key, generator in record.generators.items():  # and the generators passed explicitly
        generator.set_state(copies[key].get_state())


def attach(module: nn.Module, record: InitRecord) -> nn.Module:
    """Mark ``module`` deferred with ``record``: its meta parameters and buffers (by name) are what
    :func:`materialize` gives values. Tensors of ``module`` that are not meta are left out."""
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if t.is_meta:
            record.targets.setdefault(record.node(t), []).append(name)
    _materialize_plain_attributes(module, record)
    module.__dict__[_RECORD_ATTR] = record
    return module


def _materialize_plain_attributes(module: nn.Module, record: InitRecord) -> None:
    """Tensors the construction kept as plain attributes (``example_input_array``, a lookup
    table), not parameters or buffers: no strategy shards them and they are needed before setup
    (a pipeline traces with the example inputs), so they get their eager values (on the host)
    now, by a replay that computes only what they need."""
    found: list[tuple[nn.Module, str, Any, list[Any]]] = []  # (owner, attribute, spec, leaves)
    for sub in module.modules():
        for attr, value in list(sub.__dict__.items()):
            if attr in ("_parameters", "_buffers", "_modules", _RECORD_ATTR):
                continue
            leaves, spec = tree_flatten(value)
            if any(isinstance(x, torch.Tensor) and x.is_meta for x in leaves):
                found.append((sub, attr, spec, leaves))
    if not found:
        return
    nodes = {id(x): record.node(x) for _, _, _, leaves in found for x in leaves
             if isinstance(x, torch.Tensor) and x.is_meta}
    computed: dict[int, torch.Tensor] = {}

    def keep(node: int, value: torch.Tensor, transfers: list[dev.Transfer]) -> None:
        computed[node] = value.clone()

    _replay(record, sorted(set(nodes.values())), keep)
    for sub, attr, spec, leaves in found:
        real = [computed[nodes[id(x)]] if isinstance(x, torch.Tensor) and x.is_meta else x for x in leaves]
        sub.__dict__[attr] = tree_unflatten(real, spec)


def record_init(fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``fn(*args, **kwargs)`` (a module class or factory) built on the meta device, recorded so
    that :func:`materialize` can produce its eager values later. Returns the meta module, marked
    deferred (:func:`is_deferred`)."""
    with recording(getattr(fn, "__name__", repr(fn))) as record:
        module = fn(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise DeferredInitError(f"{getattr(fn, '__name__', fn)} returned {type(module).__name__}, not an nn.Module")
    return attach(module, record)


def deferred(fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Alias of :func:`record_init` for user code: ``self.model = deferred(GPT, config)``."""
    return record_init(fn, *args, **kwargs)


def is_deferred(module: nn.Module) -> bool:
    """Whether ``module`` was built by :func:`record_init` and is not materialized yet."""
    return _RECORD_ATTR in module.__dict__


def discard_record(module: nn.Module) -> None:
    """Forget ``module``'s recorded construction (its values come from elsewhere, e.g. a file)."""
    module.__dict__.pop(_RECORD_ATTR, None)


def _local_slice(full: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (the whole tensor, CPU) that ``dest`` holds on this rank."""
    from torch.distributed.tensor import DTensor

    if not isinstance(dest, DTensor):
        if tuple(dest.shape) != tuple(full.shape):
            raise DeferredInitError(f"shape {tuple(dest.shape)} on this rank, {tuple(full.shape)} recorded")
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, dest.device_mesh, dest.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return full[index]


@dataclass
class MaterializeStats:
    """What one :func:`materialize` did: tensors written on this rank, and the largest number of
    host bytes (distinct storages) the replay held at once (exact, counted as it runs)."""

    tensors: int = 0
    peak_host_bytes: int = 0
    ops: int = 0


def materialize(module: nn.Module, device: torch.device | str, root: nn.Module | None = None,
                prefix: str = "") -> MaterializeStats:
    """Allocate ``module``'s parameters and buffers on ``device`` and give them their eager values.

    ``module``: the (possibly split, TP-parallelized or FSDP2-sharded) model whose tensors are
    meta; ``root`` (default ``module``): the module :func:`record_init` returned, which holds the
    record; ``prefix``: ``module``'s path inside ``root`` (``""`` when they are the same).
    Parameters are matched by name. Returns :class:`MaterializeStats`. Raises
    :class:`DeferredInitError` when a local tensor has no recorded value.
    """
    root = module if root is None else root
    record: InitRecord | None = root.__dict__.get(_RECORD_ATTR)
    if record is None:
        raise DeferredInitError(f"{type(root).__name__} was not built with record_init / deferred")
    device = dev.as_device(device)
    ties = tied_parameter_groups(module)
    dests_before = {name for name, t in [*module.named_parameters(remove_duplicate=False),
                                          *module.named_buffers(remove_duplicate=False)] if t.is_meta}
    # to_empty for the meta tensors only: real ones (made outside the recording) keep their values.
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for names in ties:  # to_empty gives each name of a tied parameter its own tensor: tie them again
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, first)
    dests: dict[str, torch.Tensor] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if name in dests_before:
            dests[prefix + name] = t
    written: set[str] = set()
    from torch.distributed.tensor import DTensor

    def write(node: int, value: torch.Tensor, transfers: list[dev.Transfer]) -> None:
        for name in record.targets.get(node, ()):
            dest = dests.get(name)
            if dest is None or name in written:
                continue  # another rank's part (another stage, or not in this module)
            part = _local_slice(value, dest)
            transfers.append(dev.copy_(dest.to_local() if isinstance(dest, DTensor) else dest, part))
            written.add(name)

    wanted = [node for node, names in record.targets.items() if any(n in dests for n in names)]
    stats, _, _ = _replay(record, wanted, write)
    stats.tensors = len(written)
    missing = sorted(set(dests) - written)
    if missing:
        raise DeferredInitError(
            f"{len(missing)} tensors of {type(module).__name__} got no value from the recorded construction "
            f"(e.g. {missing[0]!r}): they were created or replaced after record_init returned. Create every parameter "
            f"and buffer inside the deferred construction"
        )
    root.__dict__.pop(_RECORD_ATTR, None)  # materialized: the record (ops, constants) is not needed again
    return stats


def _replay(record: InitRecord, wanted: list[int],
            write: Any) -> tuple[MaterializeStats, torch.Generator, dict[int, torch.Generator]]:
    """Replay the recorded construction on the host and call ``write(node, value, transfers)`` for
    every node of ``wanted`` once its value is final (no later op touches its storage); ``write``
    may start host-to-device copies, which are waited on before the host memory is released.
    Returns the stats, the stand-in of the default generator and the copies of the generators
    passed explicitly (id of the user's generator -> copy), in the states eager construction ends with."""
    local = {record.storage_of[node] for node in wanted}
    needed, finished = _plan(record, local)
    wanted_on: dict[int, list[int]] = {}  # storage key -> wanted nodes on it
    for node in wanted:
        wanted_on.setdefault(record.storage_of[node], []).append(node)
    gen = torch.Generator(device="cpu")  # stands for the default generator
    gen.set_state(record.rng_state)
    copies: dict[int, torch.Generator] = {}  # id of a generator passed explicitly -> its private copy
    values: dict[int, torch.Tensor] = dict(record.constants)  # node -> its real (host) tensor
    bases: dict[int, torch.UntypedStorage] = {}  # storage key -> its real storage
    nodes_on: dict[int, set[int]] = {}  # storage key -> nodes holding a value on it
    stats = MaterializeStats(ops=len(record.ops))

    def held() -> int:
        return sum(b.nbytes() for b in bases.values())

    def keep(node: int, t: torch.Tensor) -> None:
        values[node] = t
        key = record.storage_of[node]
        if key >= 0:
            bases.setdefault(key, t.untyped_storage())
            nodes_on.setdefault(key, set()).add(node)

    def drop(key: int) -> None:
        for node in nodes_on.pop(key, ()):
            values.pop(node, None)
        bases.pop(key, None)

    def value(node: int) -> torch.Tensor:
        """The node's tensor; for one whose value was never computed (its earlier values did not
        matter), an uninitialized stand-in on the storage's real memory, so views stay views."""
        if node in values:
            return values[node]
        if node in record.aliases:  # e.g. an nn.Parameter around an op's output
            owner, size, stride, offset = record.aliases[node]
            dtype = record.info[node][3]
        else:
            size, stride, offset, dtype = record.info[node]
        key = record.storage_of[node]
        if key not in bases:
            bases[key] = torch.UntypedStorage(record.storage_bytes[key], device="cpu")
        t = torch.empty(0, dtype=dtype).set_(bases[key], offset, size, stride)
        keep(node, t)
        return t

    def real(x: Any) -> Any:
        return value(x.node) if isinstance(x, _Ref) else x

    with torch.no_grad():
        for i, op in enumerate(record.ops):
            if needed[i] or op.random:  # a random op that is not needed still draws, in order
                args, kwargs = tree_map(real, op.args), tree_map(real, op.kwargs)
                if "device" in kwargs:
                    kwargs["device"] = torch.device("cpu")  # replayed on the host, as eager construction
                explicit = kwargs.get("generator")
                if op.random and explicit is not None and id(explicit) in record.generators:
                    copy = copies.setdefault(id(explicit), torch.Generator(device="cpu"))
                    if op.reseed is not None:
                        copy.set_state(op.reseed)  # g's state at its first draw, or after a re-seed
                    kwargs["generator"] = copy  # the user's g itself is not advanced by a replay
                    out = op.func(*args, **kwargs)
                elif op.random and explicit is None:
                    if op.reseed is not None:
                        gen.set_state(op.reseed)  # the construction re-seeded the default generator here
                    out = _draw_from(gen, op.func, args, kwargs)
                else:
                    out = op.func(*args, **kwargs)
                flat, _ = tree_flatten(out)
                for node, t in zip(op.outputs, flat):
                    if node is not None and node not in values:
                        keep(node, t)
                stats.peak_host_bytes = max(stats.peak_host_bytes, held())
                if not needed[i]:  # only its draws mattered: forget what it wrote
                    for node in [*op.written, *(n for n in op.outputs if n is not None)]:
                        key = record.storage_of[node]
                        if key >= 0:
                            drop(key)
            for key in finished.get(i, ()):  # no later op touches these storages
                transfers: list[dev.Transfer] = []
                for node in wanted_on.get(key, ()):
                    write(node, value(node), transfers)
                dev.wait_all(transfers)  # land before the host memory is released
                drop(key)
    return stats, gen, copies


def _draw_from(gen: torch.Generator, func: Any, args: Any, kwargs: dict) -> Any:
    """Run the random op ``func`` on ``gen`` in place of the default generator."""
    if _has_generator(func):
        return func(*args, **{**kwargs, "generator": gen})
    saved = torch.get_rng_state()  # torch.randn(...) (aten.randn.default): no generator argument
    torch.set_rng_state(gen.get_state())
    try:
        return func(*args, **kwargs)
    finally:
        gen.set_state(torch.get_rng_state())
        torch.set_rng_state(saved)


def _plan(record: InitRecord, local: set[int]) -> tuple[list[bool], dict[int, list[int]]]:
    """Which ops must run for their values, and when each storage is finished.

    Backwards over the ops: a storage's value is needed if this rank keeps it (``local``) or a
    needed op reads it. An op is needed if it writes (in place, or as a new output or a view) a
    storage whose value is needed after it; an op that overwrites a whole storage without reading
    it (``normal_``, ``fill_``, ...) and an op that creates a storage end the need for its earlier
    values. Ops that are not needed are skipped, except random ones, which run (on stand-ins) for
    their draws. ``finished``: op index -> storages no later op touches."""
    need: dict[int, bool] = {key: True for key in local}
    created: dict[int, int] = {}  # storage key -> index of the op whose output first holds it
    last: dict[int, int] = {}
    for i, op in enumerate(record.ops):
        leaves, _ = tree_flatten((op.args, op.kwargs))
        for node in [x.node for x in leaves if isinstance(x, _Ref)] + [n for n in op.outputs if n is not None]:
            key = record.storage_of[node]
            last[key] = i
        for node in op.outputs:
            if node is not None:
                created.setdefault(record.storage_of[node], i)
    needed = [False] * len(record.ops)
    for i in range(len(record.ops) - 1, -1, -1):
        op = record.ops[i]
        writes = {record.storage_of[n] for n in [*op.written, *(n for n in op.outputs if n is not None)]}
        if not any(need.get(key) for key in writes):
            if op.random:  # it runs for its draws: what it reads must be real (torch.normal(mean, std))
                leaves, _ = tree_flatten((op.args, op.kwargs))
                for x in leaves:
                    if isinstance(x, _Ref) and x.node != op.overwrites and x.node not in op.written:
                        need[record.storage_of[x.node]] = True
            continue
        needed[i] = True
        for key in writes:
            if created.get(key) == i:
                need[key] = False  # nothing before this op holds it
        if op.overwrites is not None:
            need[record.storage_of[op.overwrites]] = False
        leaves, _ = tree_flatten((op.args, op.kwargs))
        for x in leaves:
            if isinstance(x, _Ref) and x.node != op.overwrites:
                need[record.storage_of[x.node]] = True
    finished: dict[int, list[int]] = {}
    end = len(record.ops) - 1
    for key in set(record.storage_of.values()):
        finished.setdefault(last.get(key, end), []).append(key)
    return needed, finished


