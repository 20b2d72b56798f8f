"""StageDetector on real (tiny) Lightning runs, with a fake probe and a synthetic logged series.

Nothing here depends on LLCMonitor: the probe is a callback owning a ``history`` SeriesStore, and a
LightningModule logs a synthetic "LLC" (a step function with noise) through ``self.log``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import AlertRule, RuleConfigError, StageDetector, Transition
from devinterp_lightning.series import SeriesPoint, SeriesStore


def level(step: int, jump_at: int = 60, low: float = 1.0, high: float = 4.0) -> float:
    return high if step >= jump_at else low


class TinyModule(LightningModule):
    """Trains a linear layer; optionally logs a synthetic series ``key`` = level(step) + noise."""

    def __init__(self, key: str | None = None, noise: float = 0.3, jump_at: int = 60, seed: int = 0):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.key, self.noise, self.jump_at = key, noise, jump_at
        self.rng = np.random.default_rng(seed)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        if self.key is not None:
            step = self.global_step + 1  # the step the trainer will be at in on_train_batch_end
            self.log(self.key, level(step, self.jump_at) + self.noise * float(self.rng.normal()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 2, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class FakeProbe(Callback):
    """Stands in for LLCMonitor: every ``every`` steps appends a noisy step-function point to history."""

    def __init__(self, key: str = "llc/mean", every: int = 2, noise: float = 0.3, jump_at: int = 60,
                 flag_steps: tuple[int, ...] = (), seed: int = 0):
        self.key, self.every, self.noise, self.jump_at = key, every, noise, jump_at
        self.flag_steps = set(flag_steps)
        self.history = SeriesStore()
        self.seed = seed

    def monitor_keys(self) -> list[str]:
        return [self.key]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        rng = np.random.default_rng([self.seed, step])
        value = level(step, self.jump_at) + self.noise * float(rng.normal())
        flags = ("diverged",) if step in self.flag_steps else ()
        self.history.append(self.key, SeriesPoint(step, value, std=self.noise * 2, stderr=self.noise, flags=flags))

    def state_dict(self):
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state_dict):
        self.history.load_state_dict(state_dict["history"])


class FakePublisher(Callback):
    def __init__(self, transitions: list[Transition]):
        self._all = transitions
        self.step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = trainer.global_step

    def published_transitions(self, monitor: str) -> list[Transition]:
        return [t for t in self._all if t.monitor == monitor and t.step <= self.step]


def make_trainer(tmp_path: Path, callbacks, max_steps: int = 120, logger=False, **kw) -> Trainer:
    return Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        accelerator="cpu", devices=1, **kw,
    )


def test_probe_series_step_function_gives_one_increase(tmp_path):
    probe = FakeProbe(jump_at=60, flag_steps=(30,))
    det = StageDetector(monitor="llc/mean")
    make_trainer(tmp_path, [probe, det]).fit(TinyModule())
    cps = [t for t in det.transitions if t.kind == "changepoint"]
    assert len(cps) == 1, det.transitions
    t = cps[0]
    assert t.direction == "increase"
    assert abs(t.changepoint_step - 60) <= 2  # points every 2 steps: onset is the first point at/after 60
    assert t.level_before == pytest.approx(1.0, abs=0.3) and t.level_after == pytest.approx(4.0, abs=0.3)
    # confirmation needs `confirm` = 3 consecutive refits that place the onset within `jitter` = 2 points;
    # measured 4 steps here (2 points: the first refits put the onset a point or two early)
    assert 4 <= t.detection_delay <= 20
    assert [(s.start_step, s.end_step) for s in det.stages] == [(2, t.changepoint_step), (t.changepoint_step, None)]
    # the flagged point was skipped
    assert 30 not in [p.step for p in det.series.get("llc/mean")]
    assert 28 in [p.step for p in det.series.get("llc/mean")]


def test_callback_metrics_sampling_every_n_steps(tmp_path):
    det = StageDetector(monitor="sim/llc", every_n_steps=2)
    make_trainer(tmp_path, [det]).fit(TinyModule(key="sim/llc"))
    steps = [p.step for p in det.series.get("sim/llc")]
    assert steps == list(range(2, 121, 2))
    cps = [t for t in det.transitions if t.kind == "changepoint"]
    assert len(cps) == 1 and cps[0].direction == "increase" and abs(cps[0].changepoint_step - 60) <= 2


def test_key_no_probe_provides_is_sampled_at_the_logging_interval_by_default(tmp_path):
    # issue #15 item 5: a rule on train_loss needs no every_n_steps; Lightning logs it every log_every_n_steps
    det = StageDetector(monitor="train_loss")
    make_trainer(tmp_path, [FakeProbe(), det], max_steps=20, log_every_n_steps=4).fit(TinyModule())
    assert det.series.steps("train_loss") == [4, 8, 12, 16, 20]


def test_all_points_flagged_says_so_not_never_appeared(tmp_path):
    # issue #15 item 1: every point of the probe is flagged; the key did appear
    probe = FakeProbe(every=2, flag_steps=tuple(range(0, 41, 2)))
    det = StageDetector(monitor="llc/mean")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [probe, det], max_steps=40).fit(TinyModule())
    messages = [str(w.message) for w in caught if "StageDetector" in str(w.message)]
    assert len(messages) == 1, messages
    assert "never appeared" not in messages[0]
    assert "all 20 points of 'llc/mean' were skipped as flagged or not finite (diverged: 20)" in messages[0]
    assert "docs/troubleshooting.md" in messages[0]
    # the counts survive a checkpoint
    det2 = StageDetector(monitor="llc/mean")
    det2.load_state_dict(det.state_dict())
    assert det2.missing_message("llc/mean") == det.missing_message("llc/mean")


def test_fast_dev_run_and_sanity_check_are_skipped(tmp_path):
    rules = [AlertRule(name="jump", monitor="llc/mean", actions=["log", "checkpoint", "halt"])]
    det = StageDetector(rules=rules, checkpoint_dir=tmp_path / "ckpts")
    trainer = Trainer(fast_dev_run=5, callbacks=[FakeProbe(every=1), det], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModule())
    assert det.series.get("llc/mean") == [] and det.fired == [] and not (tmp_path / "ckpts").exists()
    assert not [w for w in caught if "StageDetector" in str(w.message)]


def test_decide_halt_is_pure_and_names_the_reason():
    det = StageDetector(rules=[AlertRule(name="stop", monitor="llc/mean", actions=["halt"])])
    assert det.decide_halt() == (False, None)
    t = Transition("llc/mean", 70, 60, "increase", 1.0, 4.0)
    for f in det.engine.on_transition(t, 70):
        det.actions.add(f)
    stop, reason = det.decide_halt()
    assert stop and reason is not None and "rule 'stop' fired at step 70" in reason
    assert det.decide_halt() == (stop, reason)  # no side effect


def test_bad_rules_fail_when_the_detector_is_built(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - name: a\n    monitor: llc/mean\n    action: [halt]\n")
    with pytest.raises(RuleConfigError, match="actions"):
        StageDetector(rules=p)


def test_rules_log_checkpoint_halt(tmp_path, caplog):
    rules = [
        AlertRule(name="jump", monitor="llc/mean", direction="increase", actions=["log", "checkpoint", "halt"]),
        AlertRule(name="never", monitor="llc/mean", direction="decrease", actions=["halt"]),
    ]
    det = StageDetector(rules=rules, checkpoint_dir=tmp_path / "ckpts")
    trainer = make_trainer(tmp_path, [FakeProbe(jump_at=60), det], max_steps=300)
    with caplog.at_level(logging.WARNING):
        trainer.fit(TinyModule())
    assert [f.rule.name for f in det.fired] == ["jump"]
    stop = det.fired[0].step
    assert trainer.global_step == stop < 100  # halted at the detection step, not at max_steps
    assert os.listdir(tmp_path / "ckpts") == [f"jump-step={stop}.ckpt"]
    assert any("rule 'jump' fired" in r.getMessage() for r in caplog.records)
    assert det.halted_by is not None and det.halted_by.rule.name == "jump"


def test_threshold_rule_on_other_monitor_fires_once_per_crossing(tmp_path):
    # The module's series crosses 2.5 once (at step 60). A rule on another monitor is watched too.
    rules = [AlertRule(name="hi", monitor="sim/llc", when="above", threshold=2.5, actions=["log"])]
    det = StageDetector(monitor="llc/mean", rules=rules, every_n_steps=1)
    make_trainer(tmp_path, [FakeProbe(), det]).fit(TinyModule(key="sim/llc", noise=0.1))
    assert [f.rule.name for f in det.fired] == ["hi"]
    assert det.fired[0].step == 60
    assert det.keys == ["llc/mean", "sim/llc"]
    assert det.transitions_for("sim/llc")  # it is segmented as well


def test_published_transitions_are_adopted_once(tmp_path):
    pub = [Transition("ed/trajectory", 40, 30, "decrease", 1.0, 0.0, kind="turning_point")]
    rules = [AlertRule(name="turn", monitor="ed/trajectory", kind="turning_point", actions=["log"])]
    det = StageDetector(monitor="ed/trajectory", rules=rules)
    make_trainer(tmp_path, [FakePublisher(pub), FakeProbe(), det], max_steps=80).fit(TinyModule())
    assert det.transitions == pub
    assert [f.rule.name for f in det.fired] == ["turn"]
    assert det.keys == ["ed/trajectory"]  # the probe's llc/mean is not watched: no rule names it


def test_monitor_that_never_appears_warns_at_the_end(tmp_path):
    rules = [AlertRule(name="typo", monitor="train_los", when="below", threshold=0.1, actions=["log"])]
    det = StageDetector(monitor="llc/mean", rules=rules, every_n_steps=5)
    with pytest.warns(UserWarning, match=r"'train_los' never appeared.*typo"):
        make_trainer(tmp_path, [FakeProbe(), det], max_steps=20).fit(TinyModule())


def test_resume_does_not_rereport(tmp_path):
    rules = [AlertRule(name="jump", monitor="llc/mean", actions=["log"])]
    det = StageDetector(rules=rules)
    trainer = make_trainer(tmp_path, [FakeProbe(), det], max_steps=100)
    trainer.fit(TinyModule())
    assert len([t for t in det.transitions if t.kind == "changepoint"]) == 1 and len(det.fired) == 1
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    det2 = StageDetector(rules=rules)
    trainer2 = make_trainer(tmp_path, [FakeProbe(), det2], max_steps=160)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resuming from a mid-epoch checkpoint"
        trainer2.fit(TinyModule(), ckpt_path=ckpt)
    assert det2.transitions == det.transitions
    assert [f.step for f in det2.fired] == [f.step for f in det.fired]
    assert det2.series.steps("llc/mean")[-1] == 160
    assert det2.series.steps("llc/mean") == list(range(2, 161, 2))  # no point taken twice


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from lightning.pytorch import Callback, Trainer
    sys.path.insert(0, {tests!r})
    from test_stage_detector import TinyModule, level
    from devinterp_lightning import AlertRule, StageDetector
    from devinterp_lightning.series import SeriesPoint, SeriesStore
    import numpy as np

    class RankProbe(Callback):
        # Only rank 0 sees a jump; the other rank's series is flat noise.
        def __init__(self):
            self.history = SeriesStore()
        def monitor_keys(self):
            return ["llc/mean"]
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            rng = np.random.default_rng([trainer.global_rank, step])
            base = level(step, 40) if trainer.global_rank == 0 else 1.0
            self.history.append("llc/mean", SeriesPoint(step, base + 0.2 * rng.normal(), stderr=0.2))

    class Report(Callback):
        def on_train_end(self, trainer, pl_module):
            det = [c for c in trainer.callbacks if isinstance(c, StageDetector)][0]
            out = dict(rank=trainer.global_rank, step=trainer.global_step,
                       transitions=[t.to_dict() for t in det.transitions if t.kind == "changepoint"],
                       fired=[f.step for f in det.fired])
            with open(os.path.join(sys.argv[1], f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump(out, f)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        rules = [AlertRule(name="stop", monitor="llc/mean", actions=["halt", "checkpoint"])]
        det = StageDetector(rules=rules, checkpoint_dir=os.path.join(sys.argv[1], "ckpts"), turning_points=False)
        trainer = Trainer(max_steps=200, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                          callbacks=[RankProbe(), det, Report()], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=sys.argv[1])
        trainer.fit(TinyModule())
    """
)


@pytest.mark.slow
def test_ddp_halt_is_reduced_across_ranks(tmp_path):
    script = tmp_path / "ddp_halt.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0["transitions"]) == 1 and r0["transitions"][0]["direction"] == "increase"
    assert r1["transitions"] == [] and r1["fired"] == []  # rank 1 saw nothing ...
    assert r0["step"] == r1["step"] == r0["fired"][0] < 200  # ... yet stopped at rank 0's step
    assert os.listdir(tmp_path / "ckpts") == [f"stop-step={r0['step']}.ckpt"]


def test_previous_binseg_model_is_still_available(tmp_path):
    det = StageDetector(monitor="llc/mean", method="binseg", penalty_scale=6.0)
    make_trainer(tmp_path, [FakeProbe(jump_at=60), det]).fit(TinyModule())
    assert [(t.direction, abs(t.changepoint_step - 60) <= 2) for t in det.transitions] == [("increase", True)]
    with pytest.raises(ValueError, match="unknown method 'l2'"):
        StageDetector(method="l2")


# ---------------------------------------------------------------------- StageWatch / RuleActions, no Trainer
def feed_step_function(watch, seed: int, key: str = "llc/mean", flag_steps=(), nan_steps=()) -> None:
    """Offer a noisy 1 -> 4 step at step 60, one point every 2 steps, recording each confirmed transition."""
    rng = np.random.default_rng(seed)
    for step in range(2, 121, 2):
        value = float("nan") if step in nan_steps else level(step) + 0.3 * float(rng.normal())
        flags = ("diverged",) if step in flag_steps else ()
        new = watch.update(key, SeriesPoint(step, value, std=0.6, stderr=0.3, flags=flags), now=step)
        for t in new or []:
            watch.record(t)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_watch_finds_the_step_and_splits_two_stages(seed):
    from devinterp_lightning.stages.watch import StageWatch
    w = StageWatch(["llc/mean"])
    feed_step_function(w, seed)
    (t,) = w.transitions("llc/mean")
    # measured over seeds 0-7: onset exactly at 60, confirmed 4-14 steps later
    assert (t.kind, t.direction, t.changepoint_step) == ("changepoint", "increase", 60)
    assert 0 < t.detection_delay <= 20
    stages = w.stages("llc/mean")
    assert [(s.start_step, s.end_step) for s in stages] == [(2, 60), (60, None)]
    assert stages[0].level == pytest.approx(1.0, abs=0.3) and stages[1].level == pytest.approx(4.0, abs=0.3)
    assert (w.stage_index("llc/mean", 58), w.stage_index("llc/mean", 60)) == (0, 1)
    assert w.onset_index(t) == 1 and w.is_boundary(t)
    assert w.all_transitions == [t] and w.missing_message("llc/mean") is None


def test_watch_skips_flagged_and_non_finite_points_and_says_why():
    from devinterp_lightning.stages.watch import StageWatch
    w = StageWatch(["llc/mean", "other"], ignore_flagged=True)
    feed_step_function(w, 0, flag_steps=(10, 12, 14), nan_steps=(20,))
    assert w.skipped("llc/mean") == {"diverged": 3, "not finite": 1}
    assert not {10, 12, 14, 20} & set(w.series.steps("llc/mean")) and len(w.series.steps("llc/mean")) == 56
    assert w.last_step("llc/mean") == 120 and w.last_step("other") == -1
    kept = StageWatch(["llc/mean"], ignore_flagged=False)
    feed_step_function(kept, 0, flag_steps=(10,), nan_steps=(20,))
    assert 10 in kept.series.steps("llc/mean") and kept.skipped("llc/mean") == {"not finite": 1}
    # a key whose every point was skipped names the counts, most frequent first, and the rules on it
    none = StageWatch(["k"])
    for step, flags in [(1, ("diverged",)), (2, ("diverged", "slow")), (3, ("slow",)), (4, ("diverged",))]:
        assert none.update("k", SeriesPoint(step, 1.0, flags=flags), now=step) is None
    msg = none.missing_message("k", ["r1"])
    assert "all 5 points of 'k' were skipped" in msg and "(diverged: 3, slow: 2); rule(s) ['r1'] never applied" in msg
    msg = w.missing_message("other", (), ["a", "b"])
    assert "'other' never appeared during training" in msg and "callback_metrics has ['a', 'b']" in msg


def test_watch_adopts_published_transitions_once_and_uses_them_as_boundaries():
    from devinterp_lightning.stages.watch import StageWatch
    w = StageWatch(["ed/trajectory"])  # no point of its own: "auto" boundaries are every transition
    t = Transition("ed/trajectory", 40, 30, "increase", 0.0, 1.0, kind="turning_point")
    assert w.adopt("ed/trajectory", t) is True
    w.record(t)
    assert w.adopt("ed/trajectory", Transition.from_dict(t.to_dict())) is False  # same transition again
    assert w.boundaries("ed/trajectory") == [t] and w.transitions("ed/trajectory") == [t]
    assert StageWatch(["x"], stage_boundaries="changepoint").boundaries("x") == []
    with pytest.raises(ValueError, match="unknown stage_boundaries"):
        StageWatch(["x"], stage_boundaries="all")


def test_watch_reindexes_logged_points_from_the_onset():
    from devinterp_lightning.stages.watch import StageWatch
    w = StageWatch(["llc/mean"])
    rng = np.random.default_rng(0)
    relogged = []
    for step in range(2, 121, 2):
        p = SeriesPoint(step, level(step) + 0.3 * float(rng.normal()), stderr=0.3)
        for t in w.update("llc/mean", p, now=step):
            w.record(t)
            relogged = w.reindex(t)
            confirmed_at = t.step
        w.mark_indexed("llc/mean", step)
    # every point from the onset (60) up to the last indexed one before the confirmation, now in stage 1
    assert relogged == [(s, 1) for s in range(60, confirmed_at, 2)] and relogged


def test_watch_state_round_trip_continues_like_an_uninterrupted_run():
    from devinterp_lightning.stages.watch import StageWatch
    whole = StageWatch(["llc/mean"], turning_points=True)
    feed_step_function(whole, 1)
    first = StageWatch(["llc/mean"], turning_points=True)
    rng = np.random.default_rng(1)
    points = [SeriesPoint(s, level(s) + 0.3 * float(rng.normal()), std=0.6, stderr=0.3) for s in range(2, 121, 2)]
    for p in points[:31]:  # stop mid-way, after the jump and before its confirmation
        for t in first.update("llc/mean", p, now=p.step) or []:
            first.record(t)
    resumed = StageWatch(["llc/mean", "new/key"], turning_points=True)  # a key added between runs starts empty
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.unseen("llc/mean", points) == points[31:]
    for p in points[31:]:
        for t in resumed.update("llc/mean", p, now=p.step) or []:
            resumed.record(t)
    assert resumed.transitions("llc/mean") == whole.transitions("llc/mean") != []
    assert resumed.stages("llc/mean") == whole.stages("llc/mean") and resumed.transitions("new/key") == []


def test_rule_actions_queue_checkpoints_and_halts_until_cleared():
    from devinterp_lightning.callbacks.detector_support import RuleActions
    from devinterp_lightning.rules import RuleEngine
    rules = [AlertRule(name="save", monitor="llc/mean", actions=["checkpoint"]),
             AlertRule(name="stop", monitor="llc/mean", actions=["log", "halt"])]
    actions = RuleActions(rules)
    assert actions.checkpoint_rules == rules[:1] and actions.can_halt
    assert actions.decide_halt() == (False, None)
    for f in RuleEngine(rules).on_transition(Transition("llc/mean", 70, 60, "increase", 1.0, 4.0), 70):
        actions.add(f)
    assert actions.wants_checkpoint(rules[0]) and not actions.wants_checkpoint(rules[1])
    stop, reason = actions.decide_halt()
    assert stop and "rule 'stop' fired at step 70" in reason
    actions.clear(halts=False)  # end of training: checkpoints are decided, halts are not
    assert not actions.wants_checkpoint(rules[0]) and actions.decide_halt() == (stop, reason)
    actions.clear()
    assert actions.decide_halt() == (False, None)
    assert not RuleActions(rules[:1]).can_halt


def test_noise_model_reaches_the_plateau_tracker_and_is_refused_elsewhere():
    # the recorded grokking series (benchmarks/data/grokking_llc.json) separates the two noise models:
    # the default puts the decline's onset at the LLC peak (60), the residual model at 600
    # (tests/test_plateaus.py pins both on the tracker itself)
    from devinterp_lightning.series import SeriesPoint

    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "grokking_llc.json").read_text())
    onsets = {}
    for model in (None, "residual"):
        detector = StageDetector(monitor="llc/mean", noise_model=model)
        for step, value, stderr, flags in zip(data["steps"], data["values"], data["stderr"], data["flags"],
                                              strict=True):
            point = SeriesPoint(step=step, value=value, std=float("nan"), stderr=stderr, flags=tuple(flags))
            for t in detector.watch.update("llc/mean", point, now=step) or []:
                detector.watch.record(t)
        onsets[model] = [t.changepoint_step for t in detector.transitions]
    assert onsets == {None: [60], "residual": [600]}
    with pytest.raises(ValueError, match="noise_model='residual' is a setting of method='plateau'"):
        StageDetector(method="binseg", noise_model="residual")
