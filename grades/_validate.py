"""Input validation of tensors (the segment table of flat buffers is :mod:`grades.segment_table`).

Every public op validates *all* of its inputs before any backend touches memory, so a bad call
raises a ``TypeError``/``ValueError`` and writes nothing. Nothing here reads device data: shapes,
dtypes, devices and layouts are host metadata, and segment tables live on the host by design
(a Megatron-style buffer's per-parameter ranges are known on the host when the buffer is built).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

#: Floating dtypes accepted for gradients and parameters by every backend.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtype of the statistics tensor returned by every op: ``[num_matrices, 3]``.
STATS_DTYPE = torch.float64
#: Columns of the statistics tensor.
SUMSQ, SUMABS, NONFINITE = 0, 1, 2


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def is_wrapper_subclass(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor subclass that keeps its data elsewhere and intercepts every op
    (``DTensor``, ``FakeTensor``, jagged ``NestedTensor``, ...): its own storage is empty, so a
    kernel handed its data pointer would read nothing or crash. Subclasses made with
    ``as_subclass`` and ``nn.Parameter`` own plain storage and are fine."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    try:
        return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)
    except (AttributeError, RuntimeError):  # no such introspection: trust only the plain types
        return True


def check_plain(t: torch.Tensor, what: str, *, sign_matters: bool = True) -> None:
    """Refuse tensors the kernels cannot read directly: wrapper subclasses, meta tensors and,
    unless only magnitudes are read (``sign_matters=False``), lazily negated views."""
    if is_wrapper_subclass(t):
        hint = (" (for a DTensor, e.g. an FSDP2 parameter, pass its local shard, .to_local(), and "
                "sum the statistics of a Shard placement across its mesh)") if type(t).__name__ == "DTensor" else ""
        raise TypeError(f"{what} is a {type(t).__name__}, a tensor subclass without plain storage; grades' "
                        f"kernels take plain tensors{hint}")
    if t.device.type == "meta":
        raise ValueError(f"{what} is on the meta device and holds no data")
    if sign_matters and t.is_neg():
        raise ValueError(f"{what} has its negative bit set (a lazily negated view, e.g. from .conj().imag), "
                         "which the kernels would read without the negation; call .resolve_neg() first")


def check_writable(written: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    """Tensors an op writes in place may not be inference tensors outside inference mode (what
    torch's own in-place ops refuse)."""
    if torch.is_inference_mode_enabled():
        return
    for name, t in written:
        if t is not None and t.is_inference():
            raise ValueError(f"{name} was made under torch.inference_mode() and cannot be updated in place "
                             "outside it")


def mark_written(tensors: Iterable[Optional[torch.Tensor]]) -> None:
    """Bump the autograd version counters of tensors a kernel wrote through raw pointers, as an
    in-place torch op would: a graph that saved one of them then refuses to backpropagate."""
    ts = [t for t in tensors if t is not None]
    if ts:
        torch.autograd.graph.increment_version(ts)


def check_tensor(t: object, what: str, *, dtypes=SUPPORTED_DTYPES, sign_matters: bool = True) -> torch.Tensor:
    """Check one tensor argument: a plain (see :func:`check_plain`), dense, contiguous, real
    floating tensor of a claimed dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    check_plain(t, what, sign_matters=sign_matters)
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {t.layout}")
    if t.is_complex():
        raise TypeError(f"{what} is complex ({_dtype_name(t.dtype)}); grades supports real tensors only")
    if t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{what} has dtype {_dtype_name(t.dtype)}; supported: {names}")
    if not t.is_contiguous():
        raise ValueError(f"{what} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "call .contiguous() first")
    return t


def check_same_device(tensors: Iterable[torch.Tensor], what: str, device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device}, expected {device} (all tensors must share one device)")


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without making the host wait: through pinned memory
    with a non-blocking copy on CUDA (torch keeps the pinned block alive until the copy is done)."""
    if host.device.type != "cpu":
        raise ValueError(f"upload copies host data, but got a tensor on {host.device}")
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class DeviceCopy:
    """A cached device copy of host data that any CUDA stream may use.

    The copy is enqueued on the stream current at construction. :meth:`get` from another stream
    makes that stream wait for the copy (a device-side wait, no host sync) and tells the caching
    allocator the tensor is in use there, so replacing the cache never frees memory a kernel on
    another stream may still read. Off CUDA it is a plain holder.
    """

    __slots__ = ("tensor", "_event", "_streams")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.tensor = upload(host, device)
        self._event = None
        self._streams: set = set()
        if self.tensor.device.type == "cuda":
            stream = torch.cuda.current_stream(self.tensor.device)
            self._event = torch.cuda.Event()
            self._event.record(stream)
            self._streams.add(stream)

    def get(self) -> torch.Tensor:
        if self._event is not None:
            stream = torch.cuda.current_stream(self.tensor.device)
            if stream not in self._streams:
                stream.wait_event(self._event)
                self.tensor.record_stream(stream)
                self._streams.add(stream)
        return self.tensor


def check_no_overlap(written: Sequence[tuple[str, Optional[torch.Tensor]]],
                     read: Sequence[tuple[str, Optional[torch.Tensor]]] = ()) -> None:
    """No tensor an op writes shares a byte of memory with any other argument, written or read
    (tensors that are only read may share memory with each other). ``None`` entries and empty
    tensors, which own no memory, are ignored."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), is_written, name)
                   for is_written, named in ((True, written), (False, read))
                   for name, t in named if t is not None and t.numel())
    reach = reach_w = None  # (end, name) of the span reaching furthest so far; of the written ones
    for start, end, is_written, name in spans:
        prev = reach if is_written else reach_w
        if prev is not None and start < prev[0]:
            raise ValueError(f"{prev[1]} and {name} share memory; a tensor that is written must occupy "
                             "its own memory")
        if reach is None or end > reach[0]:
            reach = (end, name)
        if is_written and (reach_w is None or end > reach_w[0]):
            reach_w = (end, name)


def as_tensor_list(x: object, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a list of tensors (for a flat buffer pass segments=...)")
    try:
        out = list(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a list or tuple of tensors, got {type(x).__name__}") from None
    return out


def check_frozen(frozen: object, num_matrices: int, device: torch.device) -> torch.Tensor | None:
    """``frozen`` is ``None`` or a bool tensor ``[num_matrices]`` on the tensors' device."""
    if frozen is None:
        return None
    if not isinstance(frozen, torch.Tensor):
        raise TypeError(f"frozen must be a bool tensor of shape [{num_matrices}], got {type(frozen).__name__}")
    check_plain(frozen, "frozen")
    if frozen.dtype != torch.bool:
        raise TypeError(f"frozen must have dtype bool, got {_dtype_name(frozen.dtype)}")
    if tuple(frozen.shape) != (num_matrices,):
        raise ValueError(f"frozen must have shape [{num_matrices}] (one entry per matrix), got {tuple(frozen.shape)}")
    if frozen.device != device:
        raise ValueError(f"frozen is on {frozen.device}, expected {device}")
    return frozen.contiguous()


def check_out(out: object, num_matrices: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty((num_matrices, 3), dtype=STATS_DTYPE, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    check_plain(out, "out")
    if out.dtype != STATS_DTYPE or tuple(out.shape) != (num_matrices, 3) or out.device != device:
        raise ValueError(f"out must be a float64 tensor of shape [{num_matrices}, 3] on {device}, got "
                         f"{_dtype_name(out.dtype)} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out
