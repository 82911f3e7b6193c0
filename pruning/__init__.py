"""Structured pruning of DeiT and Swin: prunable units (units.py), importance criteria
(importance.py: Taylor, magnitude), budgets and global selection (budget.py: knapsack, ratio
ranking), surgery into a real smaller network (surgery.py), the one-shot / iterative driver
(pruner.py) and the run directory with its report and reallocation plot (report.py)."""
from .budget import (ArchCost, CostModel, Floor, LatencyCost, MacsCost, MixedCost, Network, ParamsCost, Selection, Target,
                     parse_target, parse_targets, select_constrained, select_knapsack, select_ratio)
from .importance import Importance, MagnitudeImportance, Scores, TaylorImportance, get_importance
from .pruner import BatchSource, DataSource, PruneConfig, PruneResult, evaluate, finetune, prune
from .report import plot_reallocation, write_run
from .surgery import apply_plan
from .units import SUPPORTED_FAMILIES, BlockKeep, Plan, PruneError, block_infos

__all__ = ["ArchCost", "CostModel", "Floor", "LatencyCost", "MacsCost", "MixedCost", "Network", "ParamsCost", "Selection",
           "Target", "parse_target",
           "parse_targets", "select_constrained", "select_knapsack", "select_ratio", "Importance", "MagnitudeImportance",
           "Scores", "TaylorImportance",
           "get_importance", "BatchSource", "DataSource", "PruneConfig", "PruneResult", "evaluate", "finetune", "prune",
           "plot_reallocation", "write_run", "apply_plan", "SUPPORTED_FAMILIES", "BlockKeep", "Plan", "PruneError",
           "block_infos"]
