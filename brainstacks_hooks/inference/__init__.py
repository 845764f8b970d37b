"""Routed inference: the disk-offloaded stack store (paper section 6.3) and routed generation."""

from .records import ActivationReport, StackBudgetError, StackEntry, StoreStats
from .store import StackStore

# RoutedModel (router + store + generation) is exported here once its module lands.

__all__ = ["ActivationReport", "StackBudgetError", "StackEntry", "StackStore", "StoreStats"]
