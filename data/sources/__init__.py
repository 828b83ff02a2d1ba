"""Body models the data generator draws from; SOURCES feeds `python -m data.generate --source`.

Each value is a BodySource (data/sources/base.py). AnnySource and QuadrupedSource take a device;
SMPLSource and SMALSource take the user's model file, then a device.
"""
from __future__ import annotations

from data.sources.anny_source import AnnySource
from data.sources.quadruped import QuadrupedSource
from data.sources.smpl import SMALSource, SMPLSource

SOURCES = {"anny": AnnySource, "smpl": SMPLSource, "smal": SMALSource, "quadruped": QuadrupedSource}

__all__ = ["SOURCES", "AnnySource", "QuadrupedSource", "SMALSource", "SMPLSource"]
