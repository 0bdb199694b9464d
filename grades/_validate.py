"""Input validation and the host-side segment table.

Every public op validates *all* of its inputs before any backend touches memory, so a bad call
raises a ``TypeError``/``ValueError`` and writes nothing. Nothing here reads device data: shapes,
dtypes, devices and layouts are host metadata, and segment tables live on the host by design
(a Megatron-style buffer's per-parameter ranges are known on the host when the buffer is built).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

#: Floating dtypes accepted for gradients and parameters by every backend.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtype of the statistics tensor returned by every op: ``[num_matrices, 3]``.
STATS_DTYPE = torch.float64
#: Columns of the statistics tensor.
SUMSQ, SUMABS, NONFINITE = 0, 1, 2

SegmentsLike = Union["SegmentTable", torch.Tensor, Sequence[Sequence[int]], np.ndarray]


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


class SegmentTable:
    """Where each matrix lives inside a flat buffer: rows of ``(offset, length, matrix_id)``.

    Offsets and lengths are in elements of the buffer. Several segments may carry the same matrix id
    (a LoRA A/B pair, or the pieces of a matrix split across buckets); their statistics add up.
    The table is validated once, here, on the host: offsets and lengths non-negative, matrix ids in
    ``[0, num_matrices)``, no two segments overlapping, and (when ``numel`` is given, or at each use)
    no segment running past the end of the buffer.

    Args:
        segments: ``[S, 3]`` integer rows: a list of tuples, a NumPy array or a CPU tensor.
        numel: length of the buffer the table describes, checked now if given.
        num_matrices: number of matrices ``M`` (default: largest id + 1). Ids need not all be used;
            an unused id's statistics read zero.
    """

    def __init__(self, segments: SegmentsLike, *, numel: int | None = None, num_matrices: int | None = None):
        if isinstance(segments, SegmentTable):
            arr = segments.array
            num_matrices = segments.num_matrices if num_matrices is None else num_matrices
        elif isinstance(segments, torch.Tensor):
            if segments.device.type != "cpu":
                raise TypeError("segment tables live on the host: pass a CPU tensor or a list of "
                                "(offset, length, matrix_id) rows, not a tensor on " + str(segments.device))
            if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
                raise TypeError(f"segments must be an integer tensor, got {_dtype_name(segments.dtype)}")
            arr = segments.to(torch.int64).numpy()
        else:
            try:
                arr = np.asarray(segments)
            except (TypeError, ValueError, OverflowError):
                arr = None
            if arr is None or (arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer))):
                raise TypeError("segments must be rows of three integers (offset, length, matrix_id)"
                                + ("" if arr is None else f", got values of dtype {arr.dtype}"))
        if arr.size == 0:
            arr = np.zeros((0, 3), np.int64)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"segments must have shape [S, 3] (rows of offset, length, matrix_id), "
                             f"got {list(arr.shape)}")
        if arr.dtype == np.uint64 and (arr > np.iinfo(np.int64).max).any():
            raise ValueError("segment values must fit in int64")
        arr = np.array(arr, dtype=np.int64, copy=True)
        off, length, mid = arr[:, 0], arr[:, 1], arr[:, 2]
        if (off < 0).any():
            raise ValueError(f"segment {int(np.argmax(off < 0))} has a negative offset")
        if (length < 0).any():
            raise ValueError(f"segment {int(np.argmax(length < 0))} has a negative length")
        if (mid < 0).any():
            raise ValueError(f"segment {int(np.argmax(mid < 0))} has a negative matrix id")
        too_far = off > np.iinfo(np.int64).max - length  # offset + length would not fit in int64
        if too_far.any():
            i = int(np.argmax(too_far))
            raise ValueError(f"segment {i} (offset {off[i]}, length {length[i]}) ends beyond 2**63 elements")
        inferred = int(mid.max()) + 1 if len(mid) else 0
        if num_matrices is None:
            num_matrices = inferred
        if isinstance(num_matrices, bool) or not isinstance(num_matrices, (int, np.integer)):
            raise TypeError(f"num_matrices must be an int, got {type(num_matrices).__name__}")
        if not 0 <= num_matrices < 2 ** 31:
            raise ValueError(f"num_matrices must be in [0, 2**31), got {num_matrices}")
        if inferred > num_matrices:
            raise ValueError(f"segment matrix id {inferred - 1} is out of range for num_matrices={num_matrices}")
        nonempty = np.nonzero(length > 0)[0]
        order = nonempty[np.argsort(off[nonempty], kind="stable")]
        if len(order) > 1:
            ends = off[order] + length[order]
            bad = np.nonzero(off[order][1:] < ends[:-1])[0]
            if len(bad):
                a, b = int(order[bad[0]]), int(order[bad[0] + 1])
                raise ValueError(f"segments {a} [{off[a]}, {off[a] + length[a]}) and {b} "
                                 f"[{off[b]}, {off[b] + length[b]}) overlap")
        arr.flags.writeable = False  # the chunk lists and device plans cached below derive from it
        self.array = arr
        self.num_matrices = int(num_matrices)
        self.end = int((off + length).max()) if len(arr) else 0
        self._chunk_cache: dict[int, np.ndarray] = {}
        self._device_cache: dict[tuple, DeviceCopy] = {}
        if numel is not None:
            self.check_numel(numel)

    @property
    def offsets(self) -> np.ndarray:
        return self.array[:, 0]

    @property
    def lengths(self) -> np.ndarray:
        return self.array[:, 1]

    @property
    def matrix_ids(self) -> np.ndarray:
        return self.array[:, 2]

    def __len__(self) -> int:
        return len(self.array)

    def __repr__(self) -> str:
        return f"SegmentTable({len(self)} segments, {self.num_matrices} matrices, end={self.end})"

    def check_numel(self, numel: int) -> None:
        if self.end > numel:
            i = int(np.argmax(self.offsets + self.lengths))
            raise ValueError(f"segment {i} [{self.offsets[i]}, {self.offsets[i] + self.lengths[i]}) "
                             f"overruns the buffer of {numel} elements")

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], matrix_ids: Sequence[int] | None = None,
                     *, num_matrices: int | None = None) -> "SegmentTable":
        """Table for tensors laid out back to back in one buffer (``torch.cat([t.flatten() ...])``)."""
        rows, off = [], 0
        for i, t in enumerate(tensors):
            rows.append((off, t.numel(), i if matrix_ids is None else int(matrix_ids[i])))
            off += t.numel()
        return cls(rows, numel=off, num_matrices=num_matrices)

    def chunks(self, chunk: int) -> np.ndarray:
        """Split every segment into pieces of at most ``chunk`` elements: ``[C, 3]`` rows of
        ``(start, length, matrix_id)``, ordered by segment then position. Cached per chunk size.
        Backends reduce one chunk in a fixed order, then the chunks of each matrix in table order,
        which is what makes the statistics bitwise reproducible."""
        got = self._chunk_cache.get(chunk)
        if got is None:
            got = chunk_rows(self.offsets, self.lengths, self.matrix_ids, chunk)
            self._chunk_cache[chunk] = got
        return got

    def device_copy(self, name: str, device: torch.device, build) -> DeviceCopy:
        """A cached device copy of some table-derived int64 array (``build()`` returns host data;
        built and uploaded once per device)."""
        key = (name, str(device))
        c = self._device_cache.get(key)
        if c is None:
            c = DeviceCopy(torch.as_tensor(build(), dtype=torch.int64), device)
            self._device_cache[key] = c
        return c

    def device_tensor(self, name: str, device: torch.device, build) -> torch.Tensor:
        """:meth:`device_copy`'s tensor, ready for the current stream."""
        return self.device_copy(name, device, build).get()


def chunk_rows(offsets: np.ndarray, lengths: np.ndarray, matrix_ids: np.ndarray, chunk: int) -> np.ndarray:
    """Vectorised split of segments into ``(start, length, matrix_id)`` chunks of at most ``chunk``."""
    offsets = np.asarray(offsets, np.int64)
    lengths = np.asarray(lengths, np.int64)
    matrix_ids = np.asarray(matrix_ids, np.int64)
    n = (lengths + chunk - 1) // chunk
    total = int(n.sum())
    if total == 0:
        return np.zeros((0, 3), np.int64)
    seg = np.repeat(np.arange(len(lengths)), n)
    first = np.cumsum(n) - n
    k = np.arange(total) - np.repeat(first, n)
    start = offsets[seg] + k * chunk
    length = np.minimum(chunk, lengths[seg] - k * chunk)
    return np.stack([start, length, matrix_ids[seg]], axis=1)


def resolve_segments(segments: SegmentsLike, numel: int, num_matrices: int | None) -> SegmentTable:
    if isinstance(segments, SegmentTable) and (num_matrices is None or num_matrices == segments.num_matrices):
        table = segments
    else:
        table = SegmentTable(segments, num_matrices=num_matrices)
    table.check_numel(numel)
    return table
