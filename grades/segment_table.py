"""The segment table: where each matrix lives inside one flat gradient buffer.

Segment tables live on the host by design (a Megatron-style buffer's per-parameter ranges are
known on the host when the buffer is built); backends take chunk lists and cached device copies
derived from them.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from ._checks import check_number
from ._validate import DeviceCopy, _dtype_name

SegmentsLike = Union["SegmentTable", torch.Tensor, Sequence[Sequence[int]], np.ndarray]


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
        """Table for tensors laid out back to back in one buffer (``torch.cat([t.flatten() ...])``);
        ``matrix_ids`` (one per tensor, default ``0, 1, ...``) name the matrix each belongs to.

        Raises:
            ValueError: ``matrix_ids`` does not have one entry per tensor (or the table is invalid).
        """
        tensors = list(tensors)
        if matrix_ids is not None and len(matrix_ids) != len(tensors):
            raise ValueError(f"matrix_ids has {len(matrix_ids)} entries for {len(tensors)} tensors; give one "
                             "matrix id per tensor")
        rows, off = [], 0
        for i, t in enumerate(tensors):
            rows.append((off, t.numel(), i if matrix_ids is None else int(matrix_ids[i])))
            off += t.numel()
        return cls(rows, numel=off, num_matrices=num_matrices)

    def chunks(self, chunk: int) -> np.ndarray:
        """Split every segment into pieces of at most ``chunk`` elements: ``[C, 3]`` rows of
        ``(start, length, matrix_id)``, ordered by segment then position. Cached per chunk size.
        Backends reduce one chunk in a fixed order, then the chunks of each matrix in table order,
        which is what makes the statistics bitwise reproducible.

        Raises:
            TypeError, ValueError: ``chunk`` is not an integer >= 1.
        """
        got = self._chunk_cache.get(chunk)
        if got is None:
            check_number(chunk, "chunk", lo=1, integer=True)
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
    """``segments`` as a table checked against a buffer of ``numel`` elements (``ValueError``)."""
    if isinstance(segments, SegmentTable) and (num_matrices is None or num_matrices == segments.num_matrices):
        table = segments
    else:
        table = SegmentTable(segments, num_matrices=num_matrices)
    table.check_numel(numel)
    return table


__all__ = ["SegmentTable", "SegmentsLike", "chunk_rows", "resolve_segments"]
