"""Targets: what the engine pauses, asks for extra state, and resumes."""

from vmckpt.engine.targets.base import Target, TargetGone
from vmckpt.engine.targets.process import ProcessTarget

__all__ = ["ProcessTarget", "Target", "TargetGone"]
