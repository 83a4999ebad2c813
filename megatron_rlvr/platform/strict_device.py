"""Strict device mode: on a CPU machine, treat "cuda" as a different machine and fail on mixing.

Why: the CPU layer (`cpu_compat`) sends every CUDA request to the host, so a tensor that was never
moved to the device still works on CPU and only fails on a GPU, at the first forward. This mode
makes the CPU run as picky as a GPU. Turned on by `MEGATRON_RLVR_STRICT_DEVICE=1` (tests do).

How:
- Every tensor the CPU layer creates for a CUDA request (`device="cuda"`, `.cuda()`, `.to("cuda")`,
  `torch.cuda.current_device()`), and every result of an op on such tensors, is *device*; its storage
  is recorded (views and `param.data = ...` share storage, so they stay device). Moving a host tensor
  to "cuda" returns a device copy; `.cpu()` of a device tensor returns a host copy, as on a GPU.
- A `TorchDispatchMode` sees every aten op (forward and backward) and raises `DeviceMixError` when
  one op reads device and host tensors together. Host 0-dim tensors are allowed, as CUDA allows
  them as scalars; copies between the two (`copy_`, `_to_copy`) are the legitimate transfers.
- Collectives refuse host tensors, except on groups created with `backend="gloo"` (the host groups
  for object collectives, as on a GPU cluster); torch's object collectives on other groups move
  their bytes to the device first, as they do with NCCL.
- A random op with `device="cuda"` and a CPU `torch.Generator` raises (CUDA refuses it); generators
  from `platform.generator()` are device generators.
- `numpy()` of a device tensor raises (CUDA refuses it).

Foreign engines that own their tensors (vLLM) run with the checks suspended (`suspended()`).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import traceback

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ENV_VAR = "MEGATRON_RLVR_STRICT_DEVICE"


class DeviceMixError(RuntimeError):
    """An op or collective mixed device and host tensors (it would fail on a GPU)."""


class _StorageRef(int):
    """A weak reference to a storage: the handle `storage._weak_ref()` returns, freed when the
    reference is dropped. What `StorageWeakRef` does, without its Python `__init__` and
    `expired()`: the mode checks one for every tensor of every op."""
    __slots__ = ()

    def __del__(self, _free=torch.UntypedStorage._free_weak_ref, _int=int):
        _free(_int(self))


_expired = torch.UntypedStorage._expired  # of a _StorageRef: its storage was freed

_DEVICE_STORAGES: dict[int, _StorageRef] = {}
_HOST_GROUPS: set = set()
_DEVICE_GENERATORS: dict[int, torch.Generator] = {}
_ENABLED = False
class _ThreadState(threading.local):
    suspended = 0            # depth of `suspended()` blocks in this thread
    device_context = False   # inside a torch function on device tensors (see `torch_function`)


_local = _ThreadState()

# Ops that move data between host and device: legitimate with mixed inputs.
_TRANSFER_OPS = {"aten::copy_", "aten::_to_copy", "aten::_copy_from",
                 "aten::_copy_from_and_resize", "aten::set_", "aten::lift_fresh"}
# Ops that CUDA runs on all inputs alike, refusing even a host 0-dim tensor beside device ones
# (`torch.stack([device_scalar, torch.tensor(1)])` fails on a GPU: "Expected all tensors to be on
# the same device"); elementwise ops take host scalars, these do not.
_NO_HOST_SCALAR_OPS = {"aten::stack", "aten::cat"}


def enabled() -> bool:
    return _ENABLED and not _local.suspended


@contextlib.contextmanager
def suspended():
    """Run foreign code (an inference engine on its own tensors) without the checks."""
    _local.suspended += 1
    try:
        yield
    finally:
        _local.suspended -= 1


def _tensors(obj, out=None) -> list:
    """The tensors in `obj` (a tensor, or lists/tuples/dicts of them, nested). The mode runs on
    every aten op, so this is the hot path: torch's general pytree flattening doubled the CPU time
    of the multi-process tests."""
    if out is None:
        out = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple, dict)):
                _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


def tree_flatten(obj):
    """The subset of torch's pytree flatten this module needs: ([tensors], None)."""
    return _tensors(obj), None


_STRIDED = torch.strided


def _storage_key(t: torch.Tensor):
    """The identity of `t`'s storage, or None for what has no single plain storage (meta,
    sparse, and tensor subclasses such as torch_dist's ShardedTensor, whose attributes raise)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        if t.is_meta or t.layout is not _STRIDED:
            return None
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None


def is_device(t: torch.Tensor) -> bool:
    """True when `t` lives on the (simulated) device."""
    # _storage_key inlined: this runs for every tensor of every op
    if not isinstance(t, torch.Tensor):
        return False
    try:
        if t.is_meta or t.layout is not _STRIDED:
            return False
        key = t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    ref = _DEVICE_STORAGES.get(key)
    if ref is None:
        return False
    if _expired(ref):  # the storage was freed and its address reused by a host tensor
        if _DEVICE_STORAGES.get(key) is ref:
            _DEVICE_STORAGES.pop(key, None)
        return False
    return True


def tag(obj):
    """Mark every tensor in `obj` (a tensor or a nest of them) as device; returns `obj`."""
    for t in _tensors(obj):
        key = _storage_key(t)
        if key is not None:
            ref = _DEVICE_STORAGES.get(key)
            # A live reference at this address is to this very storage: already device (views,
            # in-place results). Otherwise (none, or one to a freed storage) record this one.
            if ref is None or _expired(ref):
                _DEVICE_STORAGES[key] = _StorageRef(t.untyped_storage()._weak_ref())
    return obj


def untag(obj):
    """Mark every tensor in `obj` as host; returns `obj`."""
    for t in tree_flatten(obj)[0]:
        key = _storage_key(t)
        if key is not None:
            _DEVICE_STORAGES.pop(key, None)
    return obj


def device_generator(gen: torch.Generator) -> torch.Generator:
    """Declare `gen` a device generator (what `torch.Generator(device="cuda")` is on a GPU)."""
    _DEVICE_GENERATORS[id(gen)] = gen
    return gen


def _describe(t: torch.Tensor) -> str:
    return f"{'device' if is_device(t) else 'host'} {t.dtype} {tuple(t.shape)}"


def _user_frame() -> str:
    """Where the mixing was written: the innermost frame outside torch and this layer, and the
    innermost frame of our own package if that is another one (the caller that passed the tensor)."""
    found = []
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or "/megatron_rlvr/platform/" in f or "/contextlib.py" in f:
            continue
        if not found or ("/megatron_rlvr/" in f and "/megatron_rlvr/" not in found[0].filename):
            found.append(frame)
        if "/megatron_rlvr/" in f:
            break
    return " <- ".join(f"{fr.filename}:{fr.lineno} ({fr.name}: {fr.line})" for fr in found) or "?"


def _fail(what: str, tensors) -> None:
    raise DeviceMixError(
        f"{what} mixes device and host tensors [{', '.join(_describe(t) for t in tensors)}] at "
        f"{_user_frame()}: on a GPU this fails; move the host tensor to platform.device()")


# What the mode needs to know of an aten op, by id() of its OpOverload (those live as long as the
# process; `_OPS` keeps them so): bits of the three kinds below, computed once per op.
_TRANSFER, _NO_HOST_SCALAR, _KEEPS_TAGS = 1, 2, 4
_OP_KIND: dict[int, int] = {}
_OPS: list = []


def _op_kind(func) -> int:
    name = func._schema.name
    kind = ((_TRANSFER if name in _TRANSFER_OPS else 0)
            | (_NO_HOST_SCALAR if name in _NO_HOST_SCALAR_OPS else 0)
            | (_KEEPS_TAGS if name in ("aten::copy_", "aten::set_") else 0))
    _OPS.append(func)
    _OP_KIND[id(func)] = kind
    return kind


class StrictDispatchMode(TorchDispatchMode):
    """Raises on ops that read device and host tensors together; tags results of device ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs) if kwargs else func(*args)
        if not _ENABLED or _local.suspended:
            return out
        tensors = _tensors(args)
        if kwargs:
            _tensors(kwargs, tensors)
        if not tensors:
            if _local.device_context:
                tag(out)
            return out
        kind = _OP_KIND.get(id(func))
        if kind is None:
            kind = _op_kind(func)
        device_in = host_in = False
        for t in tensors:
            if is_device(t):
                device_in = True
            elif not host_in and (kind & _NO_HOST_SCALAR or t.dim() > 0):
                host_in = True
        if not device_in:
            return out
        if host_in and not kind & _TRANSFER:
            _fail(f"op {func._schema.name}", tensors)
        # A result of an op on device tensors is on the device; so is a tensor that an op made
        # from nothing while a torch function on device tensors runs (a composite op's scratch,
        # created "on the input's device"). `torch_function` below untags explicit host copies.
        if not kind & _KEEPS_TAGS:
            tag(out)
        return out


# ------------------------------------------------------------------------- torch functions

_METHOD_WRAPPER = type(torch.Tensor.device.__get__)  # what a property read passes as `func`
_DEVICE_GETTER, _IS_CUDA_GETTER = torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__
_CUDA, _CPU, _TO, _TYPE, _NUMPY = (torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.to,
                                   torch.Tensor.type, torch.Tensor.numpy)


def _is_cuda_arg(dev) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    return (isinstance(dev, str) and dev.startswith("cuda")) or \
        (isinstance(dev, torch.device) and dev.type == "cuda")


def _is_cpu_arg(dev) -> bool:
    return (isinstance(dev, str) and dev.startswith("cpu")) or \
        (isinstance(dev, torch.device) and dev.type == "cpu")


def _target(func, args, kwargs):
    """'device', 'host' or None: where this call explicitly puts its result."""
    if func is _CUDA:
        return "device"
    if func is _CPU:
        return "host"
    dev = kwargs.get("device") if kwargs else None
    if func is _TO and dev is None and len(args) > 1 and \
            isinstance(args[1], (str, int, torch.device)) and not isinstance(args[1], bool):
        dev = args[1]
    if dev is None:
        return None
    return "device" if _is_cuda_arg(dev) else "host" if _is_cpu_arg(dev) else None


def _local_index() -> int:
    import os
    return int(os.environ.get("LOCAL_RANK", "0"))


def _any_device(tensors) -> bool:
    for t in tensors:
        if is_device(t):
            return True
    return False


def torch_function(func, args, kwargs, call):
    """The strict side of the CPU layer's torch-function mode; `call` does the redirecting."""
    if type(func) is _METHOD_WRAPPER:  # a property read: `func` is the descriptor's __get__
        if func == _DEVICE_GETTER:
            return torch.device("cuda", _local_index()) if is_device(args[0]) else \
                call(func, args, kwargs)
        if func == _IS_CUDA_GETTER:
            return is_device(args[0])
    elif func is _TYPE and len(args) == 1 and not kwargs:
        name = func(*args)  # what a GPU reports for a device tensor (Megatron's optimizers check)
        if is_device(args[0]) and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name
    tensors = _tensors(args)
    if kwargs:
        _tensors(kwargs, tensors)
    if func is _NUMPY and is_device(args[0]):
        _fail("numpy() of a device tensor", tensors)
    target = _target(func, args, kwargs)
    if target == "device" and kwargs:
        gen = kwargs.get("generator")
        if gen is not None and id(gen) not in _DEVICE_GENERATORS:
            raise DeviceMixError(f"{getattr(func, '__name__', func)} on the device with a host "
                                 f"torch.Generator at {_user_frame()}: use platform.generator()")
    previous = _local.device_context
    _local.device_context = target == "device" or (target is None and (
        previous or _any_device(tensors)))
    try:
        out = call(func, args, kwargs)
    finally:
        _local.device_context = previous
    if target == "device":
        if (func is _CUDA or func is _TO) and isinstance(out, torch.Tensor) and \
                out is args[0] and not is_device(out):
            out = out.clone()  # a host tensor moved to the device is a new tensor
        tag(out)
    elif target == "host" and isinstance(out, torch.Tensor):
        if is_device(out):
            out = untag(out.clone())  # a device tensor moved to the host is a new tensor
    elif target == "host":
        untag(out)
    elif func in _NEW_METHODS and is_device(args[0]):
        tag(out)  # `x.new_tensor(data)` and friends: on x's device (the data came from the host)
    return out


_NEW_METHODS = {torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                torch.Tensor.new_full, torch.Tensor.new_empty}


# ------------------------------------------------------------------------- collectives

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "broadcast", "reduce", "send", "recv", "isend", "irecv",
                "all_to_all_single", "all_to_all", "gather", "scatter", "_all_gather_base",
                "_reduce_scatter_base")


def _group_of(name, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    # Positional group: all_reduce(t, op, group), broadcast(t, src, group), send(t, dst, group)...
    positional = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "send": 2, "recv": 2, "isend": 2,
                  "irecv": 2, "all_gather": 2, "all_gather_into_tensor": 2,
                  "reduce_scatter_tensor": 3, "reduce_scatter": 3, "_all_gather_base": 2,
                  "_reduce_scatter_base": 3}.get(name)
    if positional is not None and len(args) > positional:
        return args[positional]
    return None


def _is_host_group(group) -> bool:
    return group is not None and group in _HOST_GROUPS


def _check_collective(name, tensors, group) -> None:
    if not enabled() or _is_host_group(group):
        return
    host = [t for t in tensors if isinstance(t, torch.Tensor) and not is_device(t)]
    if host:
        _fail(f"collective {name} on a device group", tensors)


def _wrap_collective(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items()
                                                   if k != "group"}))[0]
                   if isinstance(t, torch.Tensor)]
        _check_collective(name, tensors, _group_of(name, args, kwargs))
        return fn(*args, **kwargs)
    wrapper._strict_wrapped = True
    return wrapper


def _wrap_batch_isend_irecv(fn):
    @functools.wraps(fn)
    def wrapper(p2p_op_list):
        for op in p2p_op_list:
            _check_collective("batch_isend_irecv", [op.tensor], op.group)
        return fn(p2p_op_list)
    return wrapper


def _wrap_new_group(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if group is not None and str(backend).lower() == "gloo":
            _HOST_GROUPS.add(group)
        return group
    return wrapper


def register_host_group(group) -> None:
    """Declare `group` a host group (object collectives, metadata): host tensors allowed."""
    _HOST_GROUPS.add(group)


def _object_coll_device(original):
    @functools.wraps(original)
    def wrapper(group=None):
        if enabled() and not _is_host_group(group):
            return "cuda"  # as NCCL groups do: the CPU layer redirects and tags
        return original(group)
    return wrapper


def _patch_distributed() -> None:
    from torch.distributed import distributed_c10d as c10d

    # One wrapper per function, set on both modules: torch compares them by identity
    # (P2POp accepts only `op in [c10d.isend, c10d.irecv]`, and Megatron passes `dist.isend`).
    for name in _COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is not None and not getattr(fn, "_strict_wrapped", False):
            wrapped = _wrap_collective(name, fn)
            for module in (dist, c10d):
                if getattr(module, name, None) is fn:
                    setattr(module, name, wrapped)
    batch, new_group = (_wrap_batch_isend_irecv(c10d.batch_isend_irecv),
                        _wrap_new_group(c10d.new_group))
    for module in (dist, c10d):
        module.batch_isend_irecv = batch
        module.new_group = new_group
    c10d._get_object_coll_device = _object_coll_device(c10d._get_object_coll_device)


def apply() -> None:
    """Turn strict device mode on for this process (after `cpu_compat.apply()`)."""
    global _ENABLED
    if _ENABLED:
        return
    _ENABLED = True
    _patch_distributed()
    # Stays on the dispatch-mode stack for the life of the process, like cpu_compat's mode.
    StrictDispatchMode().__enter__()
