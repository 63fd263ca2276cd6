"""Loss heads on per-sequence log-probs (plain torch; the kernels produce their inputs)."""

from .heads import (
    LOSS_TYPES,
    PreferenceHeadOutput,
    alpha_dpo_head,
    canonical_loss_type,
    dpo_head,
    ipo_head,
    needs_reference,
    preference_metrics,
    simpo_head,
)
from .margin_stats import batch_margin_stats, update_margin_stats

__all__ = [
    "LOSS_TYPES", "PreferenceHeadOutput", "alpha_dpo_head", "batch_margin_stats", "canonical_loss_type",
    "dpo_head", "ipo_head", "needs_reference", "preference_metrics", "simpo_head", "update_margin_stats",
]
