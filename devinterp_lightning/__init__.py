"""devinterp-lightning: watch a network's local learning coefficient while it trains.

The top-level names are imported lazily, so ``import devinterp_lightning`` stays cheap and the
math core (``sampling``, ``stages``, ``theory``) never pulls in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # estimator core
    "estimate_llc": "devinterp_lightning.sampling.estimator",
    "estimate_llcs": "devinterp_lightning.sampling.estimator",
    "LLCResult": "devinterp_lightning.sampling.result",
    "summarize_chains": "devinterp_lightning.sampling.result",
    "calibrate_llc": "devinterp_lightning.sampling.calibrate",
    "CalibrationResult": "devinterp_lightning.sampling.calibrate",
    # stages and rules
    "Transition": "devinterp_lightning.stages.events",
    "Stage": "devinterp_lightning.stages.events",
    "AlertRule": "devinterp_lightning.rules",
    "load_rules": "devinterp_lightning.rules",
    "RuleConfigError": "devinterp_lightning.rules",
    # Lightning callbacks
    "LLCMonitor": "devinterp_lightning.callbacks.llc_monitor",
    "StageDetector": "devinterp_lightning.callbacks.stage_detector",
    "EssentialDynamics": "devinterp_lightning.callbacks.essential_dynamics",
    # restrictions
    "head_restrictions": "devinterp_lightning.heads",
}

__all__ = sorted([*_EXPORTS, "theory", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "theory":
        return importlib.import_module("devinterp_lightning.theory")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'devinterp_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    # ruff: noqa: F401 - these imports exist for type checkers; runtime access goes through __getattr__
    from devinterp_lightning import theory
    from devinterp_lightning.callbacks.essential_dynamics import EssentialDynamics
    from devinterp_lightning.callbacks.llc_monitor import LLCMonitor
    from devinterp_lightning.callbacks.stage_detector import StageDetector
    from devinterp_lightning.heads import head_restrictions
    from devinterp_lightning.rules import AlertRule, RuleConfigError, load_rules
    from devinterp_lightning.sampling.calibrate import CalibrationResult, calibrate_llc
    from devinterp_lightning.sampling.estimator import estimate_llc, estimate_llcs
    from devinterp_lightning.sampling.result import LLCResult, summarize_chains
    from devinterp_lightning.stages.events import Stage, Transition
