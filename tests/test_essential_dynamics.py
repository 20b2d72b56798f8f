"""Essential dynamics: incremental PCA, osculating-circle geometry, turning points, and the callback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from devinterp_lightning.essential_dynamics import (
    IncrementalPCA,
    find_turning_points,
    pair_vertices,
    planar_geometry,
)


# --------------------------------------------------------------------------------------------------
# Synthetic trajectories with known turns
# --------------------------------------------------------------------------------------------------
def polyline(seed: int, n: int = 200, d: int = 64, nseg: int = 3, noise: float = 0.02):
    """``n`` snapshots in ``R^d`` moving at constant speed along ``nseg`` straight segments in random
    directions (so ~90 degree turns) with Gaussian noise of norm ~``noise`` per snapshot (a step
    along a segment is ~0.015-0.025 long). Returns the points and the indices of the turns."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((nseg, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = rng.uniform(0.6, 1.6, nseg)
    dur = rng.uniform(0.6, 1.4, nseg)
    bounds = np.concatenate([[0], np.round(np.cumsum(dur) / dur.sum() * (n - 1)).astype(int)])
    pts = np.zeros((n, d))
    pos = np.zeros(d)
    for s in range(nseg):
        a, b = bounds[s], bounds[s + 1]
        pts[a : b + 1] = pos + np.outer((np.arange(a, b + 1) - a) / (b - a), dirs[s] * lengths[s])
        pos = pts[b]
    pts += noise * rng.standard_normal(pts.shape) / math.sqrt(d)
    return pts, [int(b) for b in bounds[1:-1]]


def detect(points: np.ndarray, k: int, **kw):
    pca = IncrementalPCA(rank=8, max_snapshots=4000)
    for i, x in enumerate(points):
        pca.add(x, i)
    scores, _, _ = pca.components(k)
    return find_turning_points(scores, pca.steps, sigma=3.0, **kw)


def score(found, turns, tol=4):
    hits = sum(any(abs(f.index - t) <= tol for f in found) for t in turns)
    false = sum(not any(abs(f.index - t) <= tol for t in turns) for f in found)
    return hits, false


# --------------------------------------------------------------------------------------------------
# Incremental PCA
# --------------------------------------------------------------------------------------------------
def _full_pca_scores(x: np.ndarray, k: int) -> np.ndarray:
    c = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    sc = u[:, :k] * s[:k]
    return sc * np.where(sc[0] > 0, -1.0, 1.0)


def test_incremental_pca_is_exact_when_the_affine_span_fits_the_rank() -> None:
    rng = np.random.default_rng(0)
    latent = np.cumsum(rng.standard_normal((80, 5)), axis=0)  # affine dimension 5 < rank 6
    x = latent @ rng.standard_normal((5, 300)) + 3.0
    pca = IncrementalPCA(rank=6, max_snapshots=500)
    for i, row in enumerate(x):
        pca.add(torch.from_numpy(row).float().double(), step=10 * i)
    scores, _, var = pca.components(3)
    np.testing.assert_allclose(scores, _full_pca_scores(x, 3), rtol=1e-7, atol=1e-7 * np.abs(x).max())
    assert pca.residual_fraction < 1e-12
    assert pca.steps == [10 * i for i in range(80)]
    # the newest snapshot's projection equals its row of the scores
    np.testing.assert_allclose(pca.project(x[-1], 3), scores[-1], rtol=1e-8, atol=1e-8 * np.abs(x).max())
    assert np.all(np.diff(var) <= 0)


def test_incremental_pca_truncation_is_close_and_reports_its_loss() -> None:
    rng = np.random.default_rng(1)
    latent = np.cumsum(rng.standard_normal((150, 3)), axis=0) * np.array([5.0, 3.0, 2.0])
    x = latent @ np.linalg.qr(rng.standard_normal((60, 3)))[0].T + 0.05 * rng.standard_normal((150, 60))
    pca = IncrementalPCA(rank=5, max_snapshots=500)
    for i, row in enumerate(x):
        pca.add(row, i)
    scores, _, _ = pca.components(3)
    exact = _full_pca_scores(x, 3)
    rel = np.linalg.norm(scores - exact) / np.linalg.norm(exact)
    assert rel < 2e-3, rel  # measured 3e-5..1.3e-4 over seeds 0-5
    c = x - x.mean(axis=0)
    s = np.linalg.svd(c, compute_uv=False)
    true_dropped = float((s[5:] ** 2).sum() / (s**2).sum())
    # the reported loss is an upper bound close to the truth: ratio 1.01-1.03 over seeds 0-5
    assert true_dropped <= pca.residual_fraction <= 1.5 * true_dropped
    assert pca.basis.shape == (60, 5) and pca.coords.shape == (150, 5)


def test_incremental_pca_memory_is_bounded_and_snapshots_stay_evenly_spaced() -> None:
    rng = np.random.default_rng(2)
    pca = IncrementalPCA(rank=4, max_snapshots=40)
    x = np.cumsum(rng.standard_normal((333, 50)), axis=0)
    for i, row in enumerate(x):
        pca.add(row, 7 * i)
        assert len(pca) <= 40 and pca.coords.shape[1] <= 4 and pca.basis.shape[1] <= 4
    steps = np.array(pca.steps)
    assert steps[0] == 0 and len(set(np.diff(steps))) == 1  # uniform spacing, starts at the beginning
    assert pca.stride == 16 and steps[-1] >= 7 * (333 - 16)


def test_incremental_pca_state_dict_round_trips_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.standard_normal((30, 20)), axis=0)
    a = IncrementalPCA(rank=4, max_snapshots=100)
    for i, row in enumerate(x[:20]):
        a.add(row, i)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k in ("center", "basis", "coords"))
    b = IncrementalPCA(rank=4, max_snapshots=100)
    b.load_state_dict(state)
    for i, row in enumerate(x[20:], start=20):
        a.add(row, i)
        b.add(row, i)
    np.testing.assert_array_equal(a.components(3)[0], b.components(3)[0])
    with pytest.raises(ValueError, match="output shape must stay fixed"):
        a.add(np.zeros(21), 99)
    with pytest.raises(ValueError, match="nan"):
        a.add(np.full(20, np.nan), 99)
    with pytest.raises(ValueError, match="max_snapshots"):
        IncrementalPCA(rank=8, max_snapshots=10)


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
def test_circle_has_curvature_one_over_radius_and_its_evolute_is_the_centre() -> None:
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    r, centre = 2.5, np.array([1.0, -3.0])
    xy = centre + r * np.stack([np.cos(t), np.sin(t)], axis=1)
    geo = planar_geometry(xy, sigma=2.0)
    # The open curve's ends are fitted one-sided (0.7% off); the interior's bias from smoothing a
    # curved arc with a quadratic is 0.2% at this sampling.
    inner = slice(10, -10)
    np.testing.assert_allclose(geo.curvature[inner], 1 / r, rtol=3e-3)  # counter-clockwise: positive
    np.testing.assert_allclose(geo.curvature, 1 / r, rtol=1e-2)
    np.testing.assert_allclose(
        geo.evolute[inner], np.broadcast_to(centre, geo.evolute[inner].shape), atol=1e-2
    )
    geo_cw = planar_geometry(xy[::-1], sigma=2.0)
    np.testing.assert_allclose(geo_cw.curvature[inner], -1 / r, rtol=3e-3)


def test_ellipse_vertices_are_the_cusps_of_its_evolute() -> None:
    # An ellipse has 4 vertices; |kappa| is maximal at the ends of the major axis (t = 0, pi),
    # where the evolute (an astroid-like curve) has its cusps on the major axis.
    t = np.linspace(0, 2 * np.pi, 401)[:-1]
    xy = np.stack([3 * np.cos(t), np.sin(t)], axis=1)
    verts, geo = pair_vertices(np.concatenate([xy, xy]), sigma=1.0, min_angle=0.1)
    idx = sorted({v[0] % 400 for v in verts if 10 < v[0] < 790})
    assert idx == [0, 200]
    np.testing.assert_allclose(geo.curvature[200], 3 / 1**2, rtol=1e-2)  # a / b^2 at the major vertex
    # cusps at (+-(a - b^2/a), 0): index 400 is t = 0, index 200 is t = pi
    np.testing.assert_allclose(geo.evolute[400], [3 - 1 / 3, 0], atol=1e-2)
    np.testing.assert_allclose(geo.evolute[200], [-(3 - 1 / 3), 0], atol=1e-2)


def test_turning_points_on_a_noiseless_polyline_are_exact() -> None:
    pts, turns = polyline(seed=0, noise=0.0)
    found = detect(pts, k=3)
    assert [abs(f.index - t) <= 2 for f, t in zip(found, turns, strict=True)] == [True, True]
    assert all(len(f.pairs) >= 2 and f.turn > math.radians(45) for f in found)


def test_turning_point_accuracy_on_noisy_polylines() -> None:
    """Known turns of 3-segment trajectories (noise ~ one step length per snapshot), 20 seeds.

    Measured with sigma=3, min_snr=3, tolerance +-4 snapshots (see docs/essential_dynamics.md):
    noise 0.02: 40/40 turns found, 0 false (with or without the tests against noise).
    """
    hits = false = total = 0
    for seed in range(20):
        pts, turns = polyline(seed=seed, noise=0.02)
        h, f = score(detect(pts, k=3), turns)
        hits, false, total = hits + h, false + f, total + len(turns)
    assert hits >= total - 2, (hits, total)
    assert false <= 2, false


def stop_and_go(
    seed: int, n: int = 200, d: int = 64, nseg: int = 3, noise: float = 0.002, width: float = 1.5
):
    """Plateaus joined by fast transitions (each a logistic step of ``width`` snapshots) along
    random directions, like saddle-to-saddle learning. Returns the points and, for each corner, the
    snapshot where the transition into it ends (centre + 3 widths)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((nseg, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = rng.uniform(0.6, 1.6, nseg)
    centers = np.sort(rng.uniform(0.1, 0.9, nseg)) * n
    while np.min(np.diff(centers)) < 30:
        centers = np.sort(rng.uniform(0.1, 0.9, nseg)) * n
    progress = 1 / (1 + np.exp(-(np.arange(n)[:, None] - centers[None]) / width))
    pts = progress @ (dirs * lengths[:, None]) + noise * rng.standard_normal((n, d)) / math.sqrt(d)
    return pts, [int(round(c + 3 * width)) for c in centers[:-1]]


def test_arclength_finds_the_corners_of_stop_and_go_trajectories() -> None:
    """Measured over 30 seeds (±4 snapshots): arclength 60/60 corners, 0 false at noise 0.002;
    58/60, 2 false at noise 0.01. In time the corners sit inside plateaus where nothing moves
    within a smoothing window, so the time parameterization finds none (0/60)."""
    hits = false = total = 0
    for seed in range(10):
        pts, turns = stop_and_go(seed)
        found = detect(pts, k=3, parameter="arclength")
        h, f = score(found, turns)
        hits, false, total = hits + h, false + f, total + len(turns)
        assert detect(pts, k=3, parameter="time") == []
    assert hits >= total - 1 and false <= 1, (hits, false, total)


def test_a_turn_seen_in_only_one_projection_is_not_kept() -> None:
    # The turn lives in the PC1/PC2 plane only; PC3 is flat noise with no matching cusp nearby.
    n = 120
    s = np.arange(n, dtype=np.float64)
    x = np.where(s < 60, s, 60.0)
    y = np.where(s < 60, 0.0, s - 60)
    z = 0.5 * np.sin(s / 7.0)  # smooth, its own (different-time) turns
    scores = np.stack([x, y, z], axis=1)
    both = find_turning_points(scores, sigma=2.0, min_pairs=1)
    assert any(abs(t.index - 60) <= 2 for t in both)
    strict = find_turning_points(scores, sigma=2.0, min_pairs=3)
    assert not any(abs(t.index - 60) <= 2 for t in strict)


def test_find_turning_points_validates_its_input() -> None:
    with pytest.raises(ValueError, match="at least 2 components"):
        find_turning_points(np.zeros((10, 1)))
    with pytest.raises(ValueError, match="steps has"):
        find_turning_points(np.zeros((10, 2)), steps=[1, 2])
    with pytest.raises(ValueError, match="parameter must be"):
        find_turning_points(np.zeros((10, 2)), parameter="index")
    assert find_turning_points(np.zeros((4, 3))) == []


# --------------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")

from devinterp_lightning.callbacks.essential_dynamics import EssentialDynamics  # noqa: E402


class Follower(pl.LightningModule):
    """A parameter vector pulled towards a target that moves along a known polyline: the model's
    function (its output = the vector) turns exactly where the target turns."""

    def __init__(self, waypoints: torch.Tensor, steps_per_segment: int) -> None:
        super().__init__()
        self.w = nn.Parameter(waypoints[0].clone())
        self.register_buffer("waypoints", waypoints)
        self.steps_per_segment = steps_per_segment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    def training_step(self, batch, batch_idx):
        seg = min(self.global_step // self.steps_per_segment, len(self.waypoints) - 2)
        frac = min((self.global_step - seg * self.steps_per_segment) / self.steps_per_segment, 1.0)
        target = self.waypoints[seg] + frac * (self.waypoints[seg + 1] - self.waypoints[seg])
        return ((self.w - target) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.4)


def _trainer(max_steps: int, callbacks, **kw):
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        **kw,
    )


def _loader(n: int = 64):
    data = torch.utils.data.TensorDataset(torch.zeros(n, 1))
    return torch.utils.data.DataLoader(data, batch_size=1)


@pytest.mark.parametrize("parameterization", ["time", "arclength"])
def test_callback_publishes_the_known_turns_of_a_trained_trajectory(parameterization: str) -> None:
    torch.manual_seed(0)
    waypoints = torch.randn(4, 32) * 3  # 3 segments -> turns at steps 200 and 400
    model = Follower(waypoints, steps_per_segment=200)
    ed = EssentialDynamics(
        torch.ones(2, 32),
        every_n_steps=5,
        num_components=3,
        image_every_n_snapshots=0,
        parameterization=parameterization,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(600, [ed]).fit(model, _loader(600))
    trans = ed.published_transitions("ed/trajectory")
    assert ed.published_transitions("llc/mean") == []
    onsets = sorted(t.changepoint_step for t in trans)
    assert len(onsets) == 2 and abs(onsets[0] - 200) <= 15 and abs(onsets[1] - 400) <= 15, onsets
    for t in trans:
        assert t.kind == "turning_point" and t.monitor == "ed/trajectory"
        # confirmed only once the smoothing window after the turn exists: 18 snapshots x 5 steps
        # in time; in arc length 18 resampled points, at this constant speed about as many steps
        assert t.step - t.changepoint_step >= (18 * 5 if parameterization == "time" else 15 * 5)
    assert ed.history.steps("ed/pc1") == list(range(0, 601, 5))
    assert set(ed.history.keys()) == {"ed/pc1", "ed/pc2", "ed/pc3", "ed/explained_variance"}
    assert ed.history.values("ed/explained_variance")[-1] > 0.95
    img = ed.render_image()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


class Noisy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_noisy(with_callback: bool):
    pl.seed_everything(0, verbose=False)
    model = Noisy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, shuffle=True
    )
    cbs = (
        [EssentialDynamics(torch.randn(8, 4, generator=g), every_n_steps=3, image_every_n_snapshots=10)]
        if with_callback
        else []
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(30, cbs).fit(model, loader)
    return model, cbs


@pytest.fixture(scope="module")
def noisy_fits():
    return _fit_noisy(True), _fit_noisy(False)


def test_callback_does_not_disturb_training(noisy_fits) -> None:
    """Dropout (RNG) and BatchNorm (running stats in train mode) would both betray a careless snapshot."""
    (with_cb, cbs), (without, _) = noisy_fits
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert with_cb.training and all(m.training for m in with_cb.modules())
    assert len(cbs[0].pca) == 11  # step 0 and every 3rd step up to 30


def test_callback_state_dict_round_trips(noisy_fits) -> None:
    (_, (ed,)), _ = noisy_fits
    state = ed.state_dict()
    fresh = EssentialDynamics(torch.zeros(8, 4), every_n_steps=3)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.trajectory()[1], ed.trajectory()[1])
    assert fresh.history.state_dict() == ed.history.state_dict()
    assert fresh.published_transitions("ed/trajectory") == ed.published_transitions("ed/trajectory")
    assert fresh.state_dict()["last_step"] == 30


def test_callback_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    waypoints = torch.randn(3, 16) * 3

    def run(max_steps, ckpt=None, save=False):
        ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=4, image_every_n_snapshots=0)
        cbs = [ed]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=60))
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=cbs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            enable_checkpointing=save,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Follower(waypoints, steps_per_segment=100), _loader(400), ckpt_path=ckpt)
        return ed

    full = run(200)
    run(60, save=True)
    resumed = run(200, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed.pca.steps == full.pca.steps == list(range(0, 201, 4))
    np.testing.assert_allclose(resumed.trajectory()[1], full.trajectory()[1], rtol=1e-9, atol=1e-9)
    assert len(full.published_transitions("ed/trajectory")) == 1  # the turn at step 100
    assert resumed.published_transitions("ed/trajectory") == full.published_transitions("ed/trajectory")
    assert resumed.history.steps("ed/pc1") == full.history.steps("ed/pc1")


def test_callback_rejects_bad_arguments_early() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        EssentialDynamics(torch.zeros(2), every_n_steps=0)
    with pytest.raises(ValueError, match="num_components"):
        EssentialDynamics(torch.zeros(2), num_components=1)
    with pytest.raises(ValueError, match="rank"):
        EssentialDynamics(torch.zeros(2), num_components=4, rank=3)
    with pytest.raises(ValueError, match="parameterization"):
        EssentialDynamics(torch.zeros(2), parameterization="steps")
    with pytest.raises(ValueError, match="probe is required"):
        EssentialDynamics(None)  # type: ignore[arg-type]
    ed = EssentialDynamics(torch.zeros(2, 4), every_n_steps=100)
    with pytest.raises(ValueError, match="every_n_steps=100"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(20, [ed]).fit(
                Noisy(),
                torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(torch.zeros(8, 4), torch.zeros(8, 1)), batch_size=4
                ),
            )


def test_callable_probe_and_forward_fn() -> None:
    calls = []

    def probe():
        calls.append(1)
        return {"x": torch.ones(3, 4)}

    ed = EssentialDynamics(
        probe, every_n_steps=2, forward_fn=lambda m, b: (m(b["x"]), {"h": m.net[0](b["x"])})
    )
    out = ed.snapshot(Noisy())
    assert out.shape == (3 * 1 + 3 * 16,) and out.dtype == torch.float64
    ed.snapshot(Noisy())
    assert len(calls) == 1  # resolved once: the probe batch stays fixed
