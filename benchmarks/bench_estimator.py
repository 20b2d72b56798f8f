"""Benchmark: devinterp-lightning's estimate_llc vs devinterp 2.0.1 vs a plain SGD training loop.

Usage: python benchmarks/bench_estimator.py [--draws 200] [--repeats 3] [--no-devinterp] [--values-only]

Part 1 (speed) and part 2 (values, ``--values``/``--values-only``) are described below.

The same estimation (model, chains, steps, batch size, one thread) is run three ways:

- ours: ``estimate_llc`` on a shuffled DataLoader over a TensorDataset.
- devinterp 2.0.1, both entry points: the high-level ``devinterp.slt.llc.llc``, and its sampling
  loop ``devinterp.slt.sampler.sample_single_chain`` called once per chain over a plain torch
  ``Dataset`` of ``{"input_ids": row}`` (no HuggingFace dataset, no zarr writing), run in its own virtualenv
  (benchmarks/.devinterp-venv, created on demand with ``pip install torch==2.13.0 devinterp==2.0.1``;
  skipped with a message if that fails). devinterp 2.x takes a HuggingFace dataset with an
  ``input_ids`` column and a per-token loss, so the regression pairs are packed as rows
  ``[x, y]`` and the loss is the per-sample MSE broadcast over the "tokens" (same mean).
- train: a plain training loop (forward, backward, SGD step) doing as many forward/backward
  steps as all chains together, on batches sliced from the same tensors.

Units: "chain-step" = one SGLD update of one chain (one forward + backward on one batch);
"training step" = one forward + backward + optimizer step of the plain loop. We report
``time per chain-step / time per training step`` (sampling overhead; issue #14 asks <= 1.1 on the linear case).
Each figure is the best of ``--repeats`` runs after one warm-up (ours and the training loop
alternate), to damp noise on a shared machine. Ours is also timed with
``batch_streams="per_chain"`` (with both batch orders) to report what independent streams cost.

Part 2, values: the same model, data and SGLD settings through devinterp 2.0.1's ``llc()`` and
through ``estimate_llc``, over a few seeds, on a linear map 4 -> 3 (lambda = 6) at a noise-free
teacher and on the noisy suite's case (label noise sigma = 1, w* = least squares; loss = per-sample
Gaussian NLL in both). Known differences, which the table in docs/validation.md explains:
devinterp averages the loss over *every* step including burn-in, and subtracts an init loss from
its first ``num_init_loss_batches`` batches (not paired with the draws' batches); ours averages the
draws after burn-in and pairs every draw with the loss at w* on the same batch.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".devinterp-venv"
NUM_CHAINS = 4
LR, NBETA, LOCALIZATION = 1e-4, 10.0, 1.0

CASES = {
    # name: (widths, activation, batch size)
    "dln-8-8-8-8-b64": ([8, 8, 8, 8], False, 64),
    "mlp-32-128-128-8-b256": ([32, 128, 128, 8], True, 256),
}


def build_model(widths: list[int], relu: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if relu and i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(widths: list[int], n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, widths[0], generator=g), torch.randn(n, widths[-1], generator=g)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def ours_runner(model, x, y, batch, draws: int, num_chains: int = NUM_CHAINS, **options):
    from devinterp_lightning import estimate_llc

    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)

    def run() -> None:
        estimate_llc(model, mse, loader, lr=LR, nbeta=NBETA, localization=LOCALIZATION,
                     num_chains=num_chains, num_draws=draws, num_burnin_steps=0, seed=0, **options)

    return run


def training_runner(model, x, y, batch: int, steps: int, device: torch.device | None = None):
    """A plain SGD loop over batches sliced from ``x``, ``y`` (as the estimator's fast path slices a
    TensorDataset), each moved to ``device`` when one is given (benchmarks/bench_cuda.py)."""
    import copy

    def run() -> None:
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        perm = torch.randperm(x.shape[0])
        pos = 0
        for _ in range(steps):
            if pos + batch > x.shape[0]:
                perm, pos = torch.randperm(x.shape[0]), 0
            idx = perm[pos : pos + batch]
            pos += batch
            xb, yb = x[idx], y[idx]
            if device is not None:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = mse(net, (xb, yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def best_interleaved(runners: list, repeats: int) -> list[float]:
    """Best-of-``repeats`` wall time of each runner, alternating them so load spikes hit all alike."""
    for run in runners:
        run()  # warm-up (first use of torch.func imports and caches)
    best = [math.inf] * len(runners)
    for _ in range(repeats):
        for i, run in enumerate(runners):
            t = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


DEVINTERP_SCRIPT = textwrap.dedent(
    """
    import json, math, sys, tempfile, time, warnings, os
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from datasets import Dataset
    from devinterp.slt.llc import llc
    torch.set_num_threads(1)
    cfg = json.loads(sys.argv[1])
    widths, relu, batch, draws, repeats = cfg["widths"], cfg["relu"], cfg["batch"], cfg["draws"], cfg["repeats"]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if relu and i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, widths[0], generator=g); y = torch.randn(4096, widths[-1], generator=g)
    ds = Dataset.from_dict({"input_ids": torch.cat([x, y], 1).tolist()}).with_format("torch")
    din = widths[0]
    def loss_fn(m, ids):
        per = ((m(ids[:, :din].float()) - ids[:, din:].float()) ** 2).mean(1)
        return per[:, None].expand(-1, ids.shape[1] - 1)
    def run():
        out = tempfile.mkdtemp() + "/s.zarr"
        return llc(model, ds, {}, lr=cfg["lr"], n_beta=cfg["nbeta"], localization=cfg["loc"],
                   num_chains=cfg["chains"], num_draws=draws, batch_size=batch, loss_fn=loss_fn,
                   output_path=out, num_init_loss_batches=1, device="cpu")
    # devinterp's own sampling loop, as a user calling it directly would: sample_single_chain per
    # chain over a plain torch Dataset of {"input_ids": row} (no HuggingFace dataset, no zarr)
    from devinterp.slt.config import SAMPLING_METHODS
    from devinterp.slt.lm_loss import make_evaluate_fn
    from devinterp.slt.sampler import sample_single_chain
    class Rows(torch.utils.data.Dataset):
        def __init__(self, t): self.t = t
        def __len__(self): return len(self.t)
        def __getitem__(self, i): return {"input_ids": self.t[i]}
    rows = Rows(torch.cat([x, y], 1))
    sgld_kwargs = dict(nbeta=cfg["nbeta"], lr=cfg["lr"], localization=cfg["loc"], noise_level=1.0,
                       weight_decay=0.0, bounding_box_size=None, save_metrics=False)
    masks = {n: None for n, _ in model.named_parameters()}
    def run_loop():
        for c in range(cfg["chains"]):
            sample_single_chain(model, rows, make_evaluate_fn(loss_fn), masks, num_draws=draws,
                                sampling_method=SAMPLING_METHODS["sgmcmc_sgld"], sampling_method_kwargs=sgld_kwargs,
                                chain=c, seed=c, batch_size=batch, callbacks=[lambda **kw: None])
    sys.stderr = open(os.devnull, "w")  # tqdm bars
    run(); run_loop()
    best = best_loop = math.inf
    for _ in range(repeats):
        t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
        t = time.perf_counter(); run_loop(); best_loop = min(best_loop, time.perf_counter() - t)
    print(json.dumps({"seconds": best, "loop_seconds": best_loop}))
    """
)


def ensure_devinterp_venv() -> Path | None:
    python = VENV / "bin" / "python"
    if python.exists():
        ok = subprocess.run([str(python), "-c", "import devinterp.slt.llc"], capture_output=True)
        if ok.returncode == 0:
            return python
    print(f"creating {VENV} with devinterp==2.0.1 (one time) ...", flush=True)
    try:
        # --system-site-packages reuses the installed torch==2.13.0 instead of downloading it again
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "devinterp==2.0.1"],
                       check=True)
    except (subprocess.CalledProcessError, OSError) as err:
        print(f"devinterp unavailable ({err}); skipping the devinterp comparison")
        return None
    return python


def time_devinterp(python: Path, widths, relu, batch, draws, repeats) -> tuple[float, float] | None:
    """Best wall times of devinterp's ``llc()`` and of its ``sample_single_chain`` loop, in seconds."""
    cfg = dict(widths=widths, relu=relu, batch=batch, draws=draws, repeats=repeats, lr=LR, nbeta=NBETA,
               loc=LOCALIZATION, chains=NUM_CHAINS)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DEVINTERP_SCRIPT)
    proc = subprocess.run([str(python), f.name, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"devinterp run failed; skipping it:\n{proc.stdout[-2000:]}")
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), float(out["loop_seconds"])


DEVINTERP_VALUES_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, os, warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from datasets import Dataset
    from devinterp.slt.llc import llc
    torch.set_num_threads(1)
    cfg = json.loads(sys.argv[1])
    blob = torch.load(cfg["path"])
    x, y, weight = blob["x"], blob["y"], blob["weight"]
    model = nn.Linear(x.shape[1], y.shape[1], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    ds = Dataset.from_dict({"input_ids": torch.cat([x, y], 1).tolist()}).with_format("torch")
    din = x.shape[1]
    def loss_fn(m, ids):  # per-sample Gaussian NLL, broadcast over the "tokens"
        per = 0.5 * ((m(ids[:, :din].float()) - ids[:, din:].float()) ** 2).sum(1)
        return per[:, None].expand(-1, ids.shape[1] - 1)
    sys.stderr = open(os.devnull, "w")  # tqdm bars
    out = []
    for seed in cfg["seeds"]:
        res = llc(model, ds, {}, lr=cfg["lr"], n_beta=cfg["nbeta"], localization=cfg["loc"],
                  num_chains=cfg["chains"], num_draws=cfg["draws"], num_burnin_steps=cfg["burnin"],
                  batch_size=cfg["batch"], loss_fn=loss_fn, init_seed=seed,
                  output_path=tempfile.mkdtemp() + "/s.zarr", device="cpu")
        out.append(float(res["llc_mean"]))
    print(json.dumps({"values": out}))
    """
)

VALUE_SETTINGS = dict(lr=5e-5, nbeta=1000.0, loc=10.0, chains=8, draws=400, burnin=100, batch=256)


def value_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """name -> (x, y, w*, lambda) for the value comparison."""
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from noisy_cases import linear_case

    noisy = linear_case(4, 3, n=4096, seed=0)
    x, y = noisy.dataset.tensors
    teacher = noisy.model[0].weight.detach().clone()
    with torch.no_grad():
        clean_y = x @ teacher.T
    return {
        "linear 4->3, noise-free teacher": (x, clean_y, teacher, noisy.llc),
        "linear 4->3, label noise sigma 1": (x, y, teacher, noisy.llc),
    }


def ours_values(x, y, weight, seeds, **options) -> list[float]:
    from devinterp_lightning import estimate_llc

    sys.path.insert(0, str(ROOT.parent / "tests"))
    from noisy_cases import gaussian_nll

    model = nn.Linear(x.shape[1], y.shape[1], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    v = VALUE_SETTINGS
    out = []
    for seed in seeds:
        loader = DataLoader(TensorDataset(x, y), batch_size=v["batch"], shuffle=True, drop_last=True)
        res = estimate_llc(model, gaussian_nll(1.0), loader, lr=v["lr"], nbeta=v["nbeta"], localization=v["loc"],
                           num_chains=v["chains"], num_draws=v["draws"], num_burnin_steps=v["burnin"], seed=seed,
                           **options)
        out.append(res.mean)
    return out


def devinterp_values(python: Path, x, y, weight, seeds) -> list[float] | None:
    with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as blob:
        torch.save({"x": x, "y": y, "weight": weight}, blob.name)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DEVINTERP_VALUES_SCRIPT)
    cfg = dict(VALUE_SETTINGS, path=blob.name, seeds=list(seeds))
    proc = subprocess.run([str(python), f.name, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"devinterp run failed; skipping it:\n{proc.stdout[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["values"]


def compare_values(python: Path | None, seeds: range) -> None:
    def show(label: str, values: list[float] | None, truth: float) -> None:
        if values is None:
            return
        t = torch.tensor(values, dtype=torch.float64)
        spread = float(t.std()) if len(values) > 1 else 0.0
        print(f"  {label:44s} {float(t.mean()):6.2f} +- {spread:4.2f}  ({100 * (float(t.mean()) / truth - 1):+5.1f}%)"
              f"  [{', '.join(f'{v:.2f}' for v in values)}]")

    v = VALUE_SETTINGS
    print(f"\nLLC values, seeds {list(seeds)}: lr {v['lr']}, nbeta {v['nbeta']}, localization {v['loc']}, "
          f"{v['chains']} chains x {v['draws']} draws after {v['burnin']} burn-in, batch {v['batch']} (epochs)")
    for name, (x, y, weight, truth) in value_cases().items():
        print(f"{name} (lambda = {truth})")
        show("ours (defaults: shared stream, loader order)", ours_values(x, y, weight, seeds), truth)
        show("ours (per_chain, replacement)", ours_values(x, y, weight, seeds, batch_streams="per_chain",
                                                         batch_order="replacement"), truth)
        if python is not None:
            show("devinterp 2.0.1 llc()", devinterp_values(python, x, y, weight, seeds), truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-devinterp", action="store_true")
    parser.add_argument("--values", action="store_true", help="also compare LLC values with devinterp")
    parser.add_argument("--values-only", action="store_true", help="only the value comparison")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    python = None if args.no_devinterp else ensure_devinterp_venv()
    if args.values_only:
        compare_values(python, range(args.seeds))
        return
    steps = NUM_CHAINS * args.draws  # chain-steps (burn-in 0)
    for name, (widths, relu, batch) in CASES.items():
        torch.manual_seed(0)
        model = build_model(widths, relu)
        x, y = make_data(widths)
        ours, train, per_chain, per_chain_iid = best_interleaved(
            [ours_runner(model, x, y, batch, args.draws), training_runner(model, x, y, batch, steps),
             ours_runner(model, x, y, batch, args.draws, batch_streams="per_chain"),
             ours_runner(model, x, y, batch, args.draws, batch_streams="per_chain", batch_order="replacement")],
            args.repeats,
        )
        timed = None if python is None else time_devinterp(python, widths, relu, batch, args.draws, args.repeats)
        theirs, their_loop = (None, None) if timed is None else timed
        print(f"\n{name}: {NUM_CHAINS} chains x {args.draws} steps, batch {batch}, 1 thread")
        print(f"  ours        {ours:7.3f} s  ({ours / steps * 1e3:.3f} ms per chain-step)")
        print(f"  train loop  {train:7.3f} s  ({train / steps * 1e3:.3f} ms per training step)")
        if theirs is not None:
            print(f"  devinterp   {theirs:7.3f} s  ({theirs / steps * 1e3:.3f} ms per chain-step)")
            print(f"  devinterp sample_single_chain loop {their_loop:7.3f} s  "
                  f"({their_loop / steps * 1e3:.3f} ms per chain-step)")
            print(f"  speed-up vs devinterp: {theirs / ours:.2f}x (llc()), {their_loop / ours:.2f}x (its sampling loop)")
        print(f"  chain-step / training step: {ours / train:.2f}")
        print(f"  per-chain streams: {per_chain / ours:.2f}x the shared stream's time "
              f"({per_chain_iid / ours:.2f}x with batch_order='replacement')")
    if args.values:
        compare_values(python, range(args.seeds))


if __name__ == "__main__":
    main()
