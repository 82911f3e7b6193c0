"""Search strategies over a supernet's space under a latency target (slimming, Optuna).

    from nas import run_search
    report = run_search("runs/supernet", "table.yaml", target_ms=2.5, out="runs/slim")   # strategy="optuna"

Strategies share one interface (`SearchStrategy.search(SearchContext) -> SearchResult`):
`LatencySlimming` (EfficientFormer's slimming), `OptunaSearch`, and the baselines `RandomSearch`,
`UniformShrink`. `HeldoutEvaluator` scores a Choice with the supernet's weights; a SearchContext also takes your
own function choice -> {"acc", "loss"} as its evaluator (wrapped in a `FunctionEvaluator`):

    ctx = SearchContext(space, supernet, table, table.compile(space), my_eval, target_ms, progress=False)
    result = LatencySlimming().search(ctx)          # result.choice; supernet.extract(result.choice) -> (model, arch)
"""
from .evaluator import FunctionEvaluator, HeldoutEvaluator, choice_key
from .optuna_search import FlatEncoding, OptunaSearch
from .random_search import RandomSearch, UniformShrink
from .run import run_search, write_run
from .slimming import LatencySlimming
from .strategy import SearchContext, SearchError, SearchResult, SearchStrategy, fastest_choice, largest_choice

__all__ = ["run_search", "write_run", "SearchStrategy", "SearchContext", "SearchResult", "SearchError",
           "LatencySlimming", "OptunaSearch", "RandomSearch", "UniformShrink", "HeldoutEvaluator", "FunctionEvaluator",
           "FlatEncoding",
           "choice_key", "fastest_choice", "largest_choice"]
