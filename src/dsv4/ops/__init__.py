"""dsv4 ops: the hot computations, each with a plain-PyTorch reference (packed.py: ops on the published FP8/FP4
weight formats)."""

from dsv4.ops.packed import experts, linear

__all__ = ["experts", "linear"]
