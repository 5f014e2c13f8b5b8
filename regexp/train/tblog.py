"""TensorBoard logging: scalars per epoch, weight histograms, and an HParams entry.

The HParams entry goes into the run's own event file (not a sub-folder), so
``tensorboard --logdir <dir>`` lists each run once and compares them in the HParams tab: each run
writes its session start (its hyperparameters) when it starts and, when it ends, its final
metrics as ``hparams/*`` scalars and its session end. No run writes an HParams *experiment*
summary, so TensorBoard builds the table from every run under the log dir.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

# metrics.json's status as the number ``hparams/status`` and as the HParams session's end status
STATUS_CODES = {"completed": 1.0, "interrupted": 0.0, "diverged": -1.0, "failed": -1.0}
END_STATUS = {"completed": "STATUS_SUCCESS", "diverged": "STATUS_FAILURE", "failed": "STATUS_FAILURE"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def after_existing_files(log_dir: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after the folder's existing ones.

    TensorBoard reads a run's event files in name order, and the name is
    ``events.out.tfevents.<whole seconds>.<host>.<pid>.<writer counter>``: a run resumed within
    the second its previous writer was opened (in the same process: a test, a sweep retrying a
    point) would get a name that sorts by pid and an unpadded counter ("10" < "9"), so its
    epochs could be read before the interrupted part's and the purge of the steps it repeats
    misapplied. Waiting for the next second (at most one) puts it after them."""
    stamps = [int(f.name.split(".")[3]) for f in log_dir.glob("events.out.tfevents.*")
              if len(f.name.split(".")) > 3 and f.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(max(0.0, max(stamps) + 1 - time.time()) + 1e-3)


class TBLogger:
    def __init__(self, log_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            after_existing_files(Path(log_dir))
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

    def png(self, tag: str, data: bytes, height: int, width: int, step: int = 0) -> None:
        """An RGB image already encoded as PNG (``add_image`` would encode it once more)."""
        if self.writer:
            from tensorboard.compat.proto.summary_pb2 import Summary

            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
            self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, hparams: Dict[str, object]) -> None:
        """Record the run's hyperparameters as TensorBoard's HParams *session start* (only that).

        No HParams *experiment* summary is written: TensorBoard uses the first one it finds under
        its log dir for every run there, so the columns would be one run's keys. Without one, it
        joins the keys of every run's session start, marks those whose values differ, and takes
        as metrics the scalar tags of those runs (see ``final_metrics``). The session's name is
        the run's folder relative to the log dir. Values: numbers, booleans and strings as they
        are, anything else as text.
        """
        if not self.writer:
            return
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for k, v in hparams.items():
            value = info.hparams[str(k)]
            if isinstance(v, bool):
                value.bool_value = v
            elif isinstance(v, (int, float)):
                value.number_value = float(v)
            else:
                value.string_value = v if isinstance(v, str) else str(v)
        self._hparams_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
            session_start_info=info))

    def final_metrics(self, metrics: Dict[str, object]) -> None:
        """Log a finished run's ``metrics.json`` numbers as ``hparams/*`` scalars, the metric
        columns of TensorBoard's HParams tab, and end its HParams session.

        Scalars: ``hparams/final_<key>`` and ``hparams/best_<key>`` for each number of the final
        and best epoch's row (``test_acc``, ``val_loss``, ``epoch``, ...),
        ``hparams/params``, ``hparams/epochs``, ``hparams/extra_<key>`` for the regularizers'
        reports, and ``hparams/status``: 1 completed, 0 interrupted, -1 diverged or failed.
        Their step is the epochs done; for an interrupted run one more, the step from which its
        resumed run's event file replaces the earlier events, so that they go when it resumes.
        The session end (its status) is written only for a run that will not go on (completed:
        success; diverged or failed: failure), since TensorBoard keeps the first one it reads;
        an interrupted run's session stays "unknown" until it ends.
        """
        if not self.writer:
            return
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        status = str(metrics.get("status", ""))
        values: Dict[str, float] = {"hparams/status": STATUS_CODES.get(status, -1.0)}
        for part in ("final", "best"):
            for k, v in (metrics.get(part) or {}).items():
                if _number(v):
                    values[f"hparams/{part}_{k}"] = float(v)
        for k in ("params", "epochs"):  # not wall_s: runs that compute the same log the same
            if _number(metrics.get(k)):
                values[f"hparams/{k}"] = float(metrics[k])
        for k, v in (metrics.get("extra") or {}).items():
            if _number(v):
                values[f"hparams/extra_{k}"] = float(v)
        step = int(metrics["epochs"]) if _number(metrics.get("epochs")) else 0
        step += status == "interrupted"
        self.scalars(values, step)
        if status in END_STATUS:
            self._hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
                session_end_info=plugin_data_pb2.SessionEndInfo(
                    status=api_pb2.Status.Value(END_STATUS[status]), end_time_secs=time.time())))
        self.writer.flush()

    def _hparams_summary(self, tag: str, data) -> None:
        """One HParams plugin summary (metadata only, as TensorBoard's own ``hparams`` writes it)."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata

        value = Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                              tensor=metadata.NULL_TENSOR)
        self.writer._get_file_writer().add_summary(Summary(value=[value]))

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
