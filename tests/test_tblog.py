"""The fast histogram writes the message TensorBoard's own ``add_histogram`` would."""
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

from regexp.train.tblog import TBLogger, default_bin_edges, histogram_proto


def _reference(t: torch.Tensor):
    return make_histogram(t.numpy().astype(float), default_bin_edges())


EDGES = torch.tensor(default_bin_edges())


@pytest.mark.parametrize("values", [
    torch.randn(1000) * 0.1,
    torch.randn(41_000, generator=torch.Generator().manual_seed(1)),
    torch.zeros(5),
    torch.tensor([5.0]),
    torch.tensor([1e-12, -1e-12, 0.0, 3.0]),
    EDGES[:7],  # values exactly on edges, at the lowest edge
    EDGES[-7:],  # ... and at the highest (that bin is closed on the right)
    EDGES[700:900],
    torch.tensor([1e20, -1e20, 1e21, 0.5], dtype=torch.float64),  # 1e21 lies outside every bin
    torch.tensor([float("nan"), 1.0, float("inf")]),
])
def test_histogram_equals_tensorboards(values):
    got, ref = histogram_proto(values), _reference(values)
    assert got.sum_squares == pytest.approx(ref.sum_squares, rel=1e-12, nan_ok=True)
    got.sum_squares = ref.sum_squares = 0.0  # float64 sums in another order; all else is exact
    assert got == ref


def test_edges_are_summarywriters(tmp_path):
    w = SummaryWriter(str(tmp_path))
    assert default_bin_edges().tolist() == [float(v) for v in w.default_bins]
    w.close()


def test_histograms_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    values = torch.randn(300, generator=torch.Generator().manual_seed(0))
    tb = TBLogger(tmp_path)
    tb.tensor_histograms({"weights/a": values, "weights/b": values * 2}, 3)
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    assert sorted(acc.Tags()["histograms"]) == ["weights/a", "weights/b"]
    (event,) = acc.Histograms("weights/b")
    ref = _reference(values * 2)
    assert event.step == 3 and event.histogram_value.num == 300
    assert list(event.histogram_value.bucket) == list(ref.bucket)
    assert event.histogram_value.max == pytest.approx(ref.max)


def test_fast_checksum_writes_the_same_bytes(tmp_path):
    """Two writers log the same events; the one with the C checksum writes identical records."""
    import os

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from regexp.train.tblog import fast_records, masked_crc32c

    data = bytes(range(256)) * 7 + b"tail"
    assert masked_crc32c(data) == reference(data) and masked_crc32c(b"") == reference(b"")
    files = []
    for name, fast in (("stock", False), ("fast", True)):
        w = SummaryWriter(str(tmp_path / name))
        assert fast_records(w) if fast else True
        fw = w._get_file_writer()
        for step in range(3):
            fw.add_summary(histogram_summary(step), step, walltime=123.0)
        w.close()
        (f,) = os.listdir(tmp_path / name)
        files.append((tmp_path / name / f).read_bytes())
    stock, fast = (_records(f) for f in files)
    # the first record (the file version) carries its own wall time; the three events are equal
    assert len(stock) == len(fast) == 4 and stock[1:] == fast[1:]


def _records(raw: bytes):
    """Split an event file into its records (length, its checksum, data, its checksum)."""
    import struct

    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        out.append(raw[i:i + 16 + n])
        i += 16 + n
    return out


def histogram_summary(step: int):
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = torch.randn(500, generator=torch.Generator().manual_seed(step))
    return Summary(value=[Summary.Value(tag="h", histo=histogram_proto(values))])


def test_a_writer_reopened_within_the_second_is_read_after_the_first(tmp_path):
    # TensorBoard orders a run's event files by name (seconds, host, pid, an unpadded writer
    # counter): without the wait a resumed run's file opened in the same second can sort first
    from conftest import read_scalars

    for _ in range(12):  # pushes the process's writer counter past 9 -> 10 (a one-digit-to-two switch)
        TBLogger(tmp_path / "other").close()
    for first, last in ((0, 3), (3, 6)):
        tb = TBLogger(tmp_path / "run", purge_step=first or None)
        for step in range(first, last):
            tb.scalars({"x": float(step)}, step)
        tb.close()
    names = sorted(f.name for f in (tmp_path / "run").iterdir())
    assert len(names) == 2 and int(names[0].split(".")[3]) < int(names[1].split(".")[3])
    assert read_scalars(tmp_path / "run")["x"] == [(s, float(s)) for s in range(6)]
