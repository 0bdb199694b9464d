"""SegmentTable: bad arguments are named errors, never an IndexError or a hang."""
import pytest
import torch

from grades import SegmentTable


def test_chunks_needs_a_positive_integer_size():
    table = SegmentTable([(0, 10, 0), (10, 5, 1)])
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk"):
            table.chunks(bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="chunk"):
            table.chunks(bad)
    assert table.chunks(4).tolist() == [[0, 4, 0], [4, 4, 0], [8, 2, 0], [10, 4, 1], [14, 1, 1]]


def test_from_tensors_needs_one_matrix_id_per_tensor():
    ts = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(5)]
    for ids in ([0, 1], [0, 1, 2, 3], []):
        with pytest.raises(ValueError, match="one matrix id per tensor"):
            SegmentTable.from_tensors(ts, ids)
    table = SegmentTable.from_tensors(ts, [1, 0, 1])
    assert table.array.tolist() == [[0, 3, 1], [3, 4, 0], [7, 5, 1]] and table.num_matrices == 2
