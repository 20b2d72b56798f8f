"""Train the deep linear network from a YAML config with LightningCLI, watching its LLC.

    python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml

``config.yaml`` wires the model, the data, an LLCMonitor (its ``loss_fn`` and ``data`` given as
import paths) and a StageDetector whose rules file (``rules.yaml``) halts training at the first
confirmed rise of the LLC, i.e. when the network has picked up a new singular value of its teacher.
Any option can be overridden on the command line, e.g. ``--trainer.max_steps 300``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the config names classes as ``examples.lightning_cli.model.*``: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch.cli import LightningCLI  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI (``args`` as on the command line; None reads ``sys.argv``)."""
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
