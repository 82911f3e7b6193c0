"""Structured pruning: importance criteria (Taylor, magnitude), budgets, and surgery."""
