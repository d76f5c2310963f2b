"""Example symphase plugin: RMS normalization across hidden units."""

from symphase_rmsnorm.plugin import RMSNorm

__all__ = ["RMSNorm"]
__version__ = "0.1.0"
