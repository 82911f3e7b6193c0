"""Fine-tuning (prune's and search's) leaves norms, biases, LayerScale, position embeddings, tokens and
attention bias tables out of weight decay (timm's rule, as supernet training does): with a decay so
strong that one step would shrink a decayed tensor by a tenth, those move only by Adam's own steps."""
import itertools

import torch

import vitslim
from nas.finetune import finetune as search_finetune
from pruning.pruner import finetune as prune_finetune
from supernet.train import NO_DECAY_NAMES, decay_groups
from pruning_nets import batches, build, tiny_deit, tiny_swin

LR, WD, STEPS = 1e-4, 1000.0, 5  # decoupled decay: each step multiplies a decayed tensor by 1 - LR * WD = 0.9


def _exempt(name, p):
    return p.dim() <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def _check(before, model):
    seen = set()
    for n, p in model.named_parameters():
        change = (p.detach() - before[n]).abs().max().item()
        if _exempt(n, p):
            # Adam moves each element by at most about LR per step
            assert change <= 2 * LR * STEPS, (n, change)
            seen.add(n.rsplit(".", 1)[-1])
        elif before[n].norm() > 0:
            assert p.detach().norm() < 0.75 * before[n].norm(), n  # 0.9^5 = 0.59 of it, give or take Adam
    return seen


def test_decay_groups_names_and_frozen():
    m = build(tiny_deit(distillation=True))
    m.head.weight.requires_grad_(False)
    decay, no = decay_groups(m.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    no_names = {names[id(p)] for p in no["params"]}
    assert {"pos_embed", "cls_token", "dist_token"} <= no_names
    assert all(m.get_parameter(n).dim() <= 1 or n in NO_DECAY_NAMES for n in no_names)
    assert id(m.head.weight) not in {id(p) for p in [*decay["params"], *no["params"]]}  # frozen: left out
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])


def test_prune_finetune_exempts_deit_and_swin_tables():
    for arch, expect in ((tiny_deit(distillation=True), {"pos_embed", "cls_token", "dist_token", "bias", "weight"}),
                         (tiny_swin(), {"relative_position_bias_table", "bias", "weight"})):
        m = build(arch)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        prune_finetune(m, itertools.cycle(batches(arch, n=2, bs=4)), STEPS, lr=LR, weight_decay=WD)
        assert expect <= _check(before, m)


def test_search_finetune_exempts_layerscale_and_attention_biases():
    from supernet.data import SyntheticShapes
    arch = vitslim.resolve_arch({
        "family": "efficientformer", "input_size": 64, "num_classes": 4, "stem": {"widths": [6, 12]},
        "stages": [{"width": 12, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 20}]},
                   {"width": 16, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 24}]},
                   {"width": 24, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 32}]},
                   {"width": 32, "downsample": {"type": "conv"}, "blocks": [
                       {"type": "meta3d", "heads": 2, "qk_dim": 8, "v_dim": 8, "ffn_hidden": 48}]}]})
    torch.manual_seed(0)
    m = vitslim.build_model(arch)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    data = SyntheticShapes(num_classes=4, image_size=64, length=16, split="train", seed=0)
    search_finetune(m, data, STEPS, batch_size=4, lr=LR, weight_decay=WD, warmup=1)
    assert {"attention_biases", "layer_scale_1", "layer_scale_2"} <= _check(before, m)


def test_search_finetune_decay_all_keeps_the_old_recipe():
    from supernet.data import SyntheticShapes
    arch = tiny_deit()
    m = build(arch)
    before = m.pos_embed.detach().clone()
    data = SyntheticShapes(num_classes=10, image_size=32, length=16, split="train", seed=0)
    search_finetune(m, data, STEPS, batch_size=4, lr=LR, weight_decay=WD, warmup=1, decay_all=True)
    assert m.pos_embed.detach().norm() < 0.75 * before.norm()


def test_a_resumed_fine_tuning_carries_two_losses_not_one_per_step():
    """Saved after every step, the resume state carries the first and the latest loss (it carried one per step:
    ~9 bytes a step in every save of a long fine-tuning); resumed from a save, or from a state of before that
    holds every step's loss, the run ends as the uninterrupted one does."""
    import copy
    arch = tiny_deit()
    data = batches(arch, n=6)
    model, saved = build(arch), {"sizes": []}

    def save(s):
        saved["sizes"].append(len(s["losses"]))
        if s["done"] == 3:
            saved["state"], saved["weights"] = copy.deepcopy(s), copy.deepcopy(model.state_dict())
    full = prune_finetune(model, iter(data), 6, lr=1e-3, save=save, save_seconds=0)
    assert full["steps"] == 6 and saved["sizes"] == [1, 2, 2, 2, 2]
    assert saved["state"]["losses"][0] == full["loss_first"]
    for old_format in (False, True):
        st = copy.deepcopy(saved["state"])
        if old_format:
            st["losses"] = [st["losses"][0], 0.5, st["losses"][1]]  # every step's loss, as states were before
        m = build(arch)
        m.load_state_dict(saved["weights"])
        assert prune_finetune(m, iter(data[3:]), 6, lr=1e-3, resume=st) == full
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
