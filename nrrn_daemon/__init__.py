"""nrrn-daemon: denoise FIB-SEM slices as they are acquired, with an unsupervised NRRN."""

from __future__ import annotations

__version__ = "0.1.0"
