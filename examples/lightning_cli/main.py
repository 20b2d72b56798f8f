"""Train the deep linear network from a YAML config with LightningCLI, watching its LLC.

    python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml

``config.yaml`` wires the model, the data, an LLCMonitor (its ``loss_fn`` and ``data`` given as
import paths) and a StageDetector whose rules file (``rules.yaml``) halts training at the first
confirmed rise of the LLC, i.e. when the network has picked up a new singular value of its teacher.

The two callbacks are config keys of their own, ``llc_monitor:`` and ``stage_detector:``, next
to ``model:``, ``data:`` and ``trainer:``. Every option can be overridden on the command line
with the key as prefix:

    python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml \\
        --trainer.max_steps 300 --llc_monitor.num_draws 100 --stage_detector.min_size 4

``python examples/lightning_cli/main.py fit --help`` lists them all. LightningCLI needs
``jsonargparse`` (``pip install -e ".[cli]"``). (Callbacks given as a list
under ``trainer.callbacks`` cannot be addressed this way: ``--trainer.callbacks.num_draws 20``
goes to the *last* callback of the list, whichever class it is.)
"""

from __future__ import annotations

import sys
from pathlib import Path

# the config names classes as ``examples.lightning_cli.model.*``: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from devinterp_lightning import LLCMonitor, StageDetector  # noqa: E402


class MonitoredCLI(LightningCLI):
    """LightningCLI with an ``llc_monitor`` and a ``stage_detector`` key.

    ``add_lightning_class_args`` gives each callback its own group of options (validated against
    its ``__init__`` signature, so a misspelled option is an error before training starts), and
    LightningCLI appends the instantiated callbacks to the trainer's ``callbacks``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LLCMonitor, "llc_monitor")
        parser.add_lightning_class_args(StageDetector, "stage_detector")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; None reads ``sys.argv``)."""
    return MonitoredCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
