"""Attention analyses of AdaptInfer (Figures 2-3, Appendix A), collected with the engine's observer mode."""

from research.analysis.dynamics import TextDynamics, iou_matrix
from research.analysis.shifts import AttentionShifts, shift_layer

__all__ = ["AttentionShifts", "TextDynamics", "iou_matrix", "shift_layer"]
