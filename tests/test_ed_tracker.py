"""The essential-dynamics turning-point tracker, its figure, and the callback's glue (sinks, skips)."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from devinterp_lightning import tags
from devinterp_lightning.essential_dynamics import IncrementalPCA, trajectory_csv, turning_points_markdown
from devinterp_lightning.logging.figures import trajectory_figure_rgb
from devinterp_lightning.stages.base import Tracker, replay
from devinterp_lightning.stages.events import Stage
from devinterp_lightning.stages.trajectory import TrajectoryTurningTracker, turn_levels


def polyline(seed: int, n: int = 200, d: int = 64, noise: float = 0.02):
    """Three straight segments in random directions of R^d at constant speed (see
    tests/test_essential_dynamics.py), and the snapshot indices of the two turns."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((3, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = rng.uniform(0.6, 1.6, 3)
    dur = rng.uniform(0.6, 1.4, 3)
    bounds = np.concatenate([[0], np.round(np.cumsum(dur) / dur.sum() * (n - 1)).astype(int)])
    pts = np.zeros((n, d))
    pos = np.zeros(d)
    for s in range(3):
        a, b = bounds[s], bounds[s + 1]
        pts[a : b + 1] = pos + np.outer((np.arange(a, b + 1) - a) / (b - a), dirs[s] * lengths[s])
        pos = pts[b]
    return pts + noise * rng.standard_normal(pts.shape) / math.sqrt(d), [int(b) for b in bounds[1:-1]]


def grow(points: np.ndarray, tracker: TrajectoryTurningTracker, k: int = 3, every: int = 10, start: int = 0):
    """Feed the tracker as the callback does: one snapshot at a time, the whole trajectory on the
    current basis each time."""
    pca = IncrementalPCA(rank=8, max_snapshots=4000)
    for i, x in enumerate(points):
        pca.add(x, every * i)
        if i >= start:
            tracker.update(pca.steps, pca.components(k)[0], now=every * i)
    return pca


# (parameterization, tolerance in snapshots, least turns found of 10, most false, lag in snapshots)
TRACKER_CASES = [("time", 4, 8, 0, 18), ("arclength", 8, 10, 1, 12)]


@pytest.mark.parametrize(("parameterization", "tol", "min_found", "max_false", "lag"), TRACKER_CASES)
def test_tracker_confirms_each_turn_once(parameterization: str, tol: int, min_found: int, max_false: int,
                                         lag: int) -> None:
    """Fed as the callback feeds it (growing trajectory, basis recomputed each snapshot), on
    3-segment polylines with noise 0.02. Measured on seeds 0-4:

    * time, +-4 snapshots: 8/10 turns, 0 false (seeds 0-29 in the benchmark: 42/60, 0 false). A
      turn is judged once, when its window completes; the missed ones were judged while the
      trajectory was still planar (two segments), so the turn showed in one component pair only
      and ``min_pairs=2`` rejected it.
    * arclength, +-8 snapshots (its turns sit a few snapshots early on steady motion): 10/10
      turns, 1 false (seeds 0-29: 59/60, 4 false); no corner published twice.
    """
    found = false = twice = 0
    for seed in range(5):
        pts, turns = polyline(seed)
        tracker = TrajectoryTurningTracker(parameterization=parameterization)
        assert isinstance(tracker, Tracker)
        grow(pts, tracker)
        onsets = [t.changepoint_step // 10 for t in tracker.transitions]
        assert len(onsets) == len(set(onsets)) == len(tracker.turning_points)
        found += sum(any(abs(o - t) <= tol for o in onsets) for t in turns)
        false += sum(not any(abs(o - t) <= tol for t in turns) for o in onsets)
        twice += sum(max(0, sum(abs(o - t) <= tol for o in onsets) - 1) for t in turns)
        for t, tp in zip(tracker.transitions, tracker.turning_points, strict=True):
            assert t.kind == "turning_point" and t.monitor == tags.ED_TRAJECTORY
            assert t.changepoint_step == tp.step
            assert t.step - t.changepoint_step >= lag * 10
    assert found >= min_found and false <= max_false and twice == 0, (found, false, twice)


def test_tracker_levels_are_the_pc1_means_around_the_turn() -> None:
    pts, _ = polyline(1)
    tracker = TrajectoryTurningTracker(parameterization="time")
    pca = grow(pts, tracker)
    assert tracker.transitions
    scores = pca.components(3)[0]
    # the levels are computed on the basis of the confirmation step; recompute them on that basis
    t, tp = tracker.transitions[0], tracker.turning_points[0]
    confirmed = t.step // 10
    sub = IncrementalPCA(rank=8, max_snapshots=4000)
    for i, x in enumerate(pts[: confirmed + 1]):
        sub.add(x, 10 * i)
    before, after = turn_levels(sub.components(3)[0][:, 0], tp.index, 9)
    assert (t.level_before, t.level_after) == (before, after)
    assert t.direction == ("increase" if after >= before else "decrease")
    assert turn_levels(np.arange(10.0), 5, 2) == (4.0, 6.0)
    assert turn_levels(np.arange(10.0), 0, 3) == (0.0, 1.5)
    assert scores.shape == (200, 3)


def test_tracker_state_round_trip_resumes_identically() -> None:
    pts, _ = polyline(2)
    full = TrajectoryTurningTracker()
    grow(pts, full)
    first = TrajectoryTurningTracker()
    grow(pts[:120], first)
    resumed = TrajectoryTurningTracker()
    resumed.load_state_dict(first.state_dict())
    grow(pts, resumed, start=120)
    assert resumed.transitions == full.transitions and len(full.transitions) >= 2
    assert resumed.turning_points == full.turning_points


def test_tracker_works_with_replay_on_a_fixed_basis() -> None:
    pts, turns = polyline(3, noise=0.0)
    pca = IncrementalPCA(rank=8, max_snapshots=4000)
    for i, x in enumerate(pts):
        pca.add(x, i)
    found = replay(TrajectoryTurningTracker(parameterization="time"), pca.steps, pca.components(3)[0])
    assert [abs(t.changepoint_step - s) <= 2 for t, s in zip(found, turns, strict=True)] == [True, True]


def test_tracker_rejects_bad_input_with_the_fix() -> None:
    tracker = TrajectoryTurningTracker()
    with pytest.raises(ValueError, match="N x k array with k >= 2"):
        tracker.update([0, 1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="steps has 2 entries"):
        tracker.update([0, 1], np.zeros((3, 2)))
    assert tracker.update(range(30), np.zeros((30, 3))) == []  # too short for a confirmed window
    for kw, msg in [({"smoothing": -1}, "smoothing"), ({"min_angle_deg": 0}, "min_angle_deg"),
                    ({"parameterization": "index"}, "parameterization"), ({"min_pairs": 0}, "min_pairs")]:
        with pytest.raises(ValueError, match=msg):
            TrajectoryTurningTracker(**kw)


def test_text_formats_are_what_the_report_reads() -> None:
    from devinterp_lightning.essential_dynamics import TurningPoint

    text = turning_points_markdown(70, [TurningPoint(index=3, step=30, pairs=((0, 1), (0, 2)), turn=math.pi / 2)])
    row = text.splitlines()[2]
    assert row == "| 70 | 30 | 90 | PC1/PC2, PC1/PC3 |"
    assert [c.strip() for c in row.strip().strip("|").split("|")][1] == "30"
    csv = trajectory_csv([0, 5], np.array([[1.0, 2.0], [3.0, 4.5]]))
    assert "step,pc1,pc2\n0,1,2\n5,3,4.5\n" in csv


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------
def test_trajectory_figure_is_an_rgb_array_drawn_without_pyplot_state() -> None:
    pts, turns = polyline(0)
    pca = IncrementalPCA(rank=8, max_snapshots=4000)
    for i, x in enumerate(pts):
        pca.add(x, i)
    scores = pca.components(3)[0]
    figs_before = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    plain = trajectory_figure_rgb(pca.steps, scores)
    marked = trajectory_figure_rgb(pca.steps, scores, turning_steps=turns, stage_steps=turns)
    assert plain.dtype == np.uint8 and plain.ndim == 3 and plain.shape[2] == 3
    assert plain.shape == marked.shape and plain.shape[1] > 2.5 * plain.shape[0]  # three panels side by side
    red = (marked[..., 0] > 200) & (marked[..., 1] < 60) & (marked[..., 2] < 60)
    assert red.sum() > 50 and ((plain[..., 0] > 200) & (plain[..., 1] < 60) & (plain[..., 2] < 60)).sum() == 0
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == figs_before
    two = trajectory_figure_rgb(pca.steps, scores[:, :2])
    assert two.shape[1] < plain.shape[1]  # one panel


# --------------------------------------------------------------------------------------------------
# Callback glue
# --------------------------------------------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from devinterp_lightning.callbacks.essential_dynamics import EssentialDynamics  # noqa: E402


class _Writer:
    def __init__(self) -> None:
        self.texts: list[tuple[str, int]] = []
        self.images: list[tuple[str, int, tuple[int, ...]]] = []

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, global_step))

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str) -> None:
        assert dataformats == "HWC" and img.dtype == np.uint8
        self.images.append((tag, global_step, img.shape))


class _RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self._writer = _Writer()
        self.metrics: list[tuple[dict[str, float], int]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> _Writer:
        return self._writer

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _Walker(pl.LightningModule):
    """Output = a parameter pulled along a two-segment path: one turn at step 60."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("way", torch.randn(3, 16, generator=g) * 3)
        self.w = torch.nn.Parameter(self.way[0].clone())

    def forward(self, x):
        return x * self.w

    def training_step(self, batch, batch_idx):
        seg = min(self.global_step // 60, 1)
        frac = min((self.global_step - 60 * seg) / 60, 1.0)
        return ((self.w - (self.way[seg] + frac * (self.way[seg + 1] - self.way[seg]))) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.4)


def _fit(callbacks, max_steps=150, **kw):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(400, 1)), batch_size=1)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Walker(), loader)
    return trainer


def test_callback_writes_its_tags_to_the_sinks() -> None:
    ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=3, image_every_n_snapshots=20, parameterization="time")
    logger = _RecordingLogger()
    _fit([ed], logger=logger)
    w = logger.experiment
    assert [t for t, _ in w.texts].count(tags.ED_TURNING_POINTS) == len(ed.turning_points) == 1
    assert (tags.ED_TRAJECTORY_FINAL, 150) in w.texts
    assert [(t, s) for t, s, _ in w.images] == [(tags.ED_TRAJECTORY, 57), (tags.ED_TRAJECTORY, 117),
                                               (tags.ED_TRAJECTORY, 150)]
    keys = {k for m, _ in logger.metrics for k in m if k.startswith(tags.ED_PREFIX)}
    assert keys == {tags.ed_component(i) for i in range(3)} | {tags.ED_EXPLAINED_VARIANCE}
    assert abs(ed.published_transitions(tags.ED_TRAJECTORY)[0].changepoint_step - 60) <= 6


def test_callback_skips_fast_dev_run() -> None:
    # every_n_steps beyond the run would be an error in a real run; a fast_dev_run only checks the loop
    ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=1000)
    _fit([ed], fast_dev_run=2)
    assert len(ed.pca) == 0 and not ed.history.keys()


def test_callback_colours_by_the_stage_source() -> None:
    class Source:
        stages = [Stage(0, 0, 60, 0.0), Stage(1, 60, None, 1.0)]

    with pytest.raises(TypeError, match="stages_from"):
        EssentialDynamics(torch.ones(1, 16), stages_from=object())  # type: ignore[arg-type]
    seen = []
    ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=5, image_every_n_snapshots=0, stages_from=Source())
    ed.render_image = lambda stage_steps=None: seen.append(stage_steps) or np.zeros((2, 2, 3), np.uint8)
    ed.image_every_n_snapshots = 10
    _fit([ed], max_steps=60, logger=_RecordingLogger())
    assert seen and all(s == [60] for s in seen)
