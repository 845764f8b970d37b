"""Routed inference: the disk-offloaded stack store (paper section 6.3) and routed generation."""

from .store import ActivationReport, StackBudgetError, StackEntry, StackStore, StoreStats

# RoutedModel (router + store + generation) is exported here once its module lands.

__all__ = ["ActivationReport", "StackBudgetError", "StackEntry", "StackStore", "StoreStats"]
