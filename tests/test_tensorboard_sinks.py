"""TensorBoard stage markers, read back from the event files with EventAccumulator."""

from __future__ import annotations

import csv
import glob
import os

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_stage_detector import FakeProbe, TinyModule  # tests/ is on sys.path (rootdir-relative import)

from devinterp_lightning import AlertRule, StageDetector
from devinterp_lightning import tags as tag_names
from devinterp_lightning.logging.figures import stage_figure_rgb
from devinterp_lightning.logging.tensorboard import custom_scalars_layout, transition_markdown
from devinterp_lightning.stages.events import Stage, Transition


def test_transition_markdown_and_layout():
    t = Transition("llc/mean", 70, 60, "increase", 1.0, 4.0)
    md = transition_markdown(t, 1)
    header, rule, row = md.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 11
    assert "| llc/mean | changepoint | increase | 60 | 70 | 10 | 1 | 4 | +3 | 1 |" == row
    layout = custom_scalars_layout("llc/mean")
    assert layout["devinterp"]["llc/mean ± std"] == ["Margin", ["llc/mean", "llc/mean_lower", "llc/mean_upper"]]


def test_stage_figure_draws_something():
    steps = list(range(0, 100, 2))
    values = [1.0 if s < 60 else 4.0 for s in steps]
    img = stage_figure_rgb("llc/mean", steps, values, [0.5] * len(steps),
                           [Stage(0, 0, 60, 1.0), Stage(1, 60, None, 4.0)],
                           [Transition("llc/mean", 70, 60, "increase", 1.0, 4.0)])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # not a blank canvas


def test_event_files_hold_the_stage_markers(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csvl = CSVLogger(str(tmp_path), name="csv", version=0)
    rules = [AlertRule(name="jump", monitor="llc/mean", direction="increase", actions=["log"])]
    det = StageDetector(rules=rules)
    trainer = Trainer(max_steps=120, callbacks=[FakeProbe(jump_at=60, flag_steps=(10, 90)), det], logger=[tb, csvl],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, log_every_n_steps=1)
    trainer.fit(TinyModule())
    (t,) = [t for t in det.transitions if t.kind == "changepoint"]

    files = glob.glob(os.path.join(tmp_path, "tb", "version_0", "events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(os.path.join(tmp_path, "tb", "version_0"), size_guidance={"images": 0, "scalars": 0,
                                                                                    "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    # stage/index: a step function that is 0 before the onset and 1 from it (written at point steps)
    stage = {e.step: e.value for e in acc.Scalars("stage/index")}
    assert stage[t.changepoint_step - 2] == 0.0 and stage[120] == 1.0
    assert sorted({v for s, v in stage.items() if s >= t.step}) == [1.0]
    # std band around the mean
    lower = {e.step: e.value for e in acc.Scalars("llc/mean_lower")}
    upper = {e.step: e.value for e in acc.Scalars("llc/mean_upper")}
    assert set(lower) == set(upper) and all(abs(upper[s] - lower[s] - 1.2) < 1e-5 for s in lower)  # 2 * std
    # one text entry per transition (Markdown table) and one for the rule's log action
    texts = tags["tensors"]
    assert "stages/llc/mean/text_summary" in texts and "rules/jump/text_summary" in texts
    (entry,) = [e for e in acc.Tensors("stages/llc/mean/text_summary")
                if f"| {t.changepoint_step} |" in e.tensor_proto.string_val[0].decode()]
    assert entry.step == t.step
    assert "changepoint | increase" in entry.tensor_proto.string_val[0].decode()
    # next to each display text, a JSON record for programs (the report reads these)
    def records(tag):
        return [(e.step, tag_names.decode_record(e.tensor_proto.string_val[0].decode())) for e in acc.Tensors(tag)]

    detector_rec, *transition_recs = records("stages/llc/mean/json/text_summary")
    assert detector_rec == (0, {"record": "detector", "version": 1, "monitor": "llc/mean",
                                "stage_index_tag": "stage/index", "step": 0})
    (rec_step, rec), = [(s, r) for s, r in transition_recs if r["kind"] == "changepoint"]
    assert rec_step == t.step
    assert {k: rec[k] for k in t.to_dict()} == t.to_dict()
    assert rec["stage_index"] == 1 and rec["stage_index_tag"] == "stage/index"
    (rule_step, rule), = records("rules/jump/json/text_summary")
    assert rule["rule"] == "jump" and rule_step == rule["step"] == t.step and "jump" in rule["text"]
    # the flagged points: one record each, at the point's own step, and left out of the series
    flagged = records("stages/llc/mean/flagged/text_summary")
    assert [(s, r["step"], r["flags"]) for s, r in flagged] == [(10, 10, ["diverged"]), (90, 90, ["diverged"])]
    assert 10 not in lower and 90 not in lower

    # the curve image: at the transition and at the end
    img_steps = [e.step for e in acc.Images("stages/llc/mean/curve")]
    assert t.step in img_steps and 120 in img_steps
    # the custom-scalars layout: one per run, with a Margin chart on llc/mean
    (layout_event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_event.tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    margin = charts["llc/mean ± std"].margin.series[0]
    assert (margin.value, margin.lower, margin.upper) == ("llc/mean", "llc/mean_lower", "llc/mean_upper")
    assert list(charts["loss"].multiline.tag) == [r".*loss.*"]

    # the CSV logger still gets the scalars
    with open(os.path.join(tmp_path, "csv", "version_0", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    stage_rows = [r for r in rows if r.get("stage/index")]
    assert stage_rows and float(stage_rows[-1]["stage/index"]) == 1.0
    assert any(r.get("llc/mean_upper") for r in rows)


def test_records_round_trip_and_refuse_what_they_cannot_read():
    t = Transition("llc/mean", 70, 60, "increase", 1.0, float("nan"))
    rec = tag_names.decode_record(tag_names.transition_record(t, 2, "stage/index"))
    assert rec["record"] == "transition" and rec["changepoint_step"] == 60 and rec["stage_index"] == 2
    assert np.isnan(rec["level_after"])  # NaN survives (as the string "nan": JSON has no NaN)
    assert "NaN" not in tag_names.transition_record(t, 2, "stage/index")
    flagged = tag_names.decode_record(tag_names.flagged_record("llc/mean", 5, float("-inf"), float("nan"), ("negative",)))
    assert flagged["value"] == float("-inf") and flagged["flags"] == ["negative"]
    assert tag_names.decode_record("| not | json |") is None
    assert tag_names.decode_record('{"record": "transition", "version": 99}') is None  # a newer writer
    assert tag_names.decode_record('{"a": 1}') is None
    assert tag_names.is_record_tag("stages/llc/mean/json/text_summary") and tag_names.is_record_tag("rules/x/json")
    assert not tag_names.is_record_tag("stages/llc/mean") and not tag_names.is_record_tag("ed/turning_points")
