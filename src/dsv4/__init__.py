"""dsv4: DeepSeek-V4 on your own hardware."""

from __future__ import annotations

__version__ = "0.1.0"
