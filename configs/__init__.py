"""Accelerator presets (``<name>.yaml``), shipped as package data.

:func:`bitdet.core.config.load_config` reads them by name.
"""
