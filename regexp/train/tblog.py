"""TensorBoard logging: scalars per epoch, weight histograms, and an HParams entry.

The HParams summary goes into the run's own event file (not a sub-folder), so
``tensorboard --logdir <sweep dir>`` lists each job once and compares them in the HParams tab.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

HPARAM_METRICS = ("acc/val", "acc/test", "loss/val", "loss/test", "acc/train", "loss/train")


class TBLogger:
    def __init__(self, log_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            fast_records(self.writer)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def histograms(self, model: nn.Module, step: int) -> None:
        self.tensor_histograms({f"weights/{name}": p for name, p in model.named_parameters()}, step)

    def tensor_histograms(self, tensors: Dict[str, torch.Tensor], step: int) -> None:
        """One histogram per tag, as ``add_histogram`` (default bins) writes it, in one event."""
        if self.writer:
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, histo=histogram_proto(t)) for tag, t in tensors.items()]
            self.writer._get_file_writer().add_summary(Summary(value=values), step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        if self.writer:
            self.writer.add_figure(tag, fig, step)

    def hparams(self, hparams: Dict[str, object], metrics: Iterable[str] = HPARAM_METRICS) -> None:
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, {m: 0.0 for m in metrics})
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (the checksum every event record carries)."""
    import google_crc32c

    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_records(writer) -> bool:
    """Make ``writer``'s event file use a C checksum; return whether it could.

    Without TensorFlow installed, TensorBoard checksums each record in pure Python (~150 ns
    per byte) on its writer thread, holding the GIL: a weight histogram (~9 KB) costs ~1.4 ms
    of the training thread's time. The record format and bytes stay exactly the same. Only
    this writer is changed (not TensorBoard's module), and if TensorBoard's internals ever
    differ from what is expected here, the writer is left as it is.
    """
    import struct

    try:
        import google_crc32c

        records = writer._get_file_writer().event_writer._async_writer._writer
        out = records._writer
    except (ImportError, AttributeError):
        return False
    if getattr(google_crc32c, "implementation", "c") != "c":
        return False

    def write(data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        out.write(header + struct.pack("<I", masked_crc32c(header)) + data
                  + struct.pack("<I", masked_crc32c(data)))

    records.write = write
    return True


_EDGES = None


def default_bin_edges():
    """``SummaryWriter``'s default ("tensorflow") bin edges, float64: 0 and ±1e-12·1.1^k < 1e20."""
    global _EDGES
    if _EDGES is None:
        import numpy as np

        v, pos = 1e-12, []
        while v < 1e20:
            pos.append(v)
            v *= 1.1
        _EDGES = np.array([-x for x in reversed(pos)] + [0.0] + pos)
    return _EDGES


def histogram_proto(values: torch.Tensor):
    """The ``HistogramProto`` that ``SummaryWriter.add_histogram(tag, values)`` builds.

    ``np.histogram`` searches all 1548 default bins for every tensor (~1 ms each, the largest
    logging cost of a small model); here only the edges between the tensor's min and max are
    searched. The result is the same message: counts, limits, min, max, num and sum alike; the
    sum of squares is the same float64 sum up to rounding (another BLAS adds it up).
    """
    import numpy as np
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    t = values.detach().reshape(-1).to("cpu", torch.float64)
    v = t.numpy()
    if v.size == 0:
        raise ValueError("The input has no element.")
    s = np.sort(v)
    edges = default_bin_edges()
    last = len(edges) - 1
    # np.histogram: bin i holds edges[i] <= v < edges[i+1] (the last bin also v == edges[-1]);
    # bins outside [lo, hi) are empty because no value lies there.
    lo = max(int(np.searchsorted(edges, s[0], "right")) - 1, 0)
    hi = max(min(int(np.searchsorted(edges, s[-1], "right")), last), lo + 1)
    cum = np.empty(hi - lo + 1, dtype=np.int64)
    cum[:-1] = np.searchsorted(s, edges[lo:hi], "left")
    cum[-1] = np.searchsorted(s, edges[hi], "right" if hi == last else "left")
    counts = np.zeros(last, dtype=np.int64)
    counts[lo:hi] = np.diff(cum)
    # TensorBoard's trimming (torch.utils.tensorboard.summary.make_histogram): keep the bins
    # from the first to the last non-empty one, plus one empty bin on the left.
    nonzero = np.cumsum(np.greater(counts, 0))
    start, end = np.searchsorted(nonzero, [0, nonzero[-1] - 1], side="right")
    start, end = int(start), int(end) + 1
    counts = counts[start - 1:end] if start > 0 else np.concatenate([[0], counts[:end]])
    limits = edges[start:end + 1]
    if counts.size == 0 or limits.size == 0:
        raise ValueError("The histogram is empty: no value lies inside the default bins.")
    # torch's dot, not numpy's: numpy's BLAS starts threads that keep spinning on the other
    # cores after the call (a second core's worth of CPU time for a one-thread run).
    return HistogramProto(min=v.min(), max=v.max(), num=len(v), sum=v.sum(), sum_squares=float(torch.dot(t, t)),
                          bucket_limit=limits.tolist(), bucket=counts.tolist())


def layer_grad_norms(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Gradient norm of each weight matrix / kernel (the parameters with 2+ dimensions)."""
    return {name: p.grad.detach().norm() for name, p in model.named_parameters()
            if p.grad is not None and p.dim() >= 2}
