"""Markers at the onset (issue #12): ``stage/index`` read back from the event file switches at the
transition's onset, not at its confirmation, and the CSV logger's last row per step agrees."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_stage_detector import FakeProbe, TinyModule, make_trainer  # tests/ is on sys.path

from devinterp_lightning import StageDetector


def last_per_step(events) -> dict[int, float]:
    """What TensorBoard shows: a step written again replaces the series from that step on."""
    out: dict[int, float] = {}
    for e in events:  # file order
        for s in [s for s in out if s >= e.step]:
            del out[s]
        out[e.step] = e.value
    return out


def test_stage_index_switches_at_the_onset_in_the_event_file_and_csv(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csvl = CSVLogger(str(tmp_path), name="csv", version=0)
    det = StageDetector(monitor="llc/mean", images=False)
    trainer = make_trainer(tmp_path, [FakeProbe(jump_at=60), det], max_steps=120, logger=[tb, csvl],
                           log_every_n_steps=1)
    trainer.fit(TinyModule())
    (t,) = det.transitions
    assert t.step > t.changepoint_step  # confirmed later than its onset: the case to get right

    acc = EventAccumulator(os.path.join(tmp_path, "tb", "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("stage/index")
    shown = last_per_step(events)
    steps = sorted(shown)
    assert steps == det.series.steps("llc/mean")  # one value per point, none lost by the rewrite
    assert {shown[s] for s in steps if s < t.changepoint_step} == {0.0}
    assert {shown[s] for s in steps if s >= t.changepoint_step} == {1.0}
    # the rewrite happened at confirmation: the points between onset and confirmation were written twice
    rewritten = [e.step for e in events if e.value == 1.0 and e.step < t.step]
    assert rewritten and min(rewritten) == t.changepoint_step

    with open(os.path.join(tmp_path, "csv", "version_0", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("stage/index")]
    csv_last = {int(r["step"]): float(r["stage/index"]) for r in rows}  # later rows win
    assert csv_last == {s: shown[s] for s in steps}
