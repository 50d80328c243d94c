"""Training objectives, one registry for every stage, chosen by ``objective.name``.

``bce`` (stage 2, diagnosis: masked multi-label BCE), ``infonce`` and ``siglip`` (stage 1,
image-report alignment), ``report_lm`` (report generation). Each is an :class:`~medfuse_core.objectives.base.Objective`.
"""

from medfuse_core.objectives import alignment, diagnosis, report_generation  # noqa: F401  (they register themselves)
from medfuse_core.objectives.base import Objective, to_device
from medfuse_core.objectives.registry import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "Objective", "build_objective", "to_device"]
