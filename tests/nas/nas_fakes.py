"""A search context on fake latency and accuracy (no supernet, no table, nothing measured), for tests that
hand-work a search's path: four one-block stages, widths 16 or 32, meta4d or identity."""
import numpy as np
import torch

from nas.strategy import SearchContext
from supernet.space import SearchSpace

STAGE = {"max_depth": 1, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]}


def four_stage_space() -> SearchSpace:
    return SearchSpace.from_dict({"version": 1, "family": "efficientformer", "input_size": 64, "num_classes": 4,
                                  "width_step": 16, "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
                                  "stages": [STAGE] * 4})


def fake_ctx(ms, score, target, importance=(1.0, 2.0, 3.0, 4.0), log_dir=None, supernet=True, space=None,
             probabilities=None) -> SearchContext:
    """`ms(choice)`: its predicted latency; `score(choice)`: {"acc", "loss"}; `importance`: each stage's (and its one
    position's) importance, for the paper's actions, or the supernet's whole importance record ({"metapath",
    "stage"}); `supernet=False`: none (Optuna, random search need none). `space` (default: four one-block stages)
    and `probabilities` (its architecture weights' softmax; default: 0.9 for the first candidate) for other spaces."""
    space = space or four_stage_space()
    record = importance if isinstance(importance, dict) else {"metapath": [[float(v)] for v in importance],
                                                              "stage": [float(v) for v in importance]}
    probs = probabilities if probabilities is not None else [torch.tensor([[0.9, 0.1]])] * len(space.stages)

    class Compiled:
        def score_choices(self, cs):
            return np.array([ms(c) for c in cs])

    class Supernet:
        def probabilities(self):
            return probs

        def importance(self):
            return record
    Supernet.space = space

    class Evaluator:
        evaluations = 0

        def __call__(self, c):
            self.evaluations += 1
            return score(c)

        def prime(self, *a):
            pass

    return SearchContext(space=space, supernet=Supernet() if supernet else None, table=None, compiled=Compiled(),
                         evaluator=Evaluator(), target_ms=target, progress=False, log_dir=log_dir)
