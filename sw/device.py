"""Compatibility name of the host driver: everything is in :mod:`bitdet.sw.driver`
(link → session → planner → device, docs/driver.md); ``from bitdet.sw.device import
Device, ...`` keeps working."""

from .driver import *  # noqa: F403
from .driver import __all__  # noqa: F401
