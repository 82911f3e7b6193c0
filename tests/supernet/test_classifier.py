"""timm's classifier API on every family: get_classifier / reset_classifier, for fine-tuning a network vitslim
built, found or pruned on another dataset (a frozen backbone and a new head)."""
import pytest
import torch

import vitslim

ARCHS = {  # one tiny network per family, with its distillation head where the family has one
    "efficientformer": {
        "family": "efficientformer", "input_size": 32, "num_classes": 7, "distillation": True,
        "stem": {"widths": [4, 8]},
        "stages": [{"width": 8, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 16}]},
                   {"width": 12, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 16}]},
                   {"width": 16, "downsample": {"type": "conv"},
                    "blocks": [{"type": "meta3d", "heads": 2, "qk_dim": 4, "v_dim": 6, "ffn_hidden": 24}]}]},
    "efficientvit": {
        "family": "efficientvit", "input_size": 32, "num_classes": 7, "distillation": True,
        "stem": {"widths": [4, 4, 8, 8]},
        "stages": [{"width": 8, "downsample": None,
                    "blocks": [{"type": "cga", "heads": 2, "qk_dim": 4, "kernels": [3, 3], "ffn_hidden": 16,
                                "ffn2_hidden": 16}]}]},
    "shvit": {
        "family": "shvit", "input_size": 32, "num_classes": 7, "distillation": True,
        "stem": {"widths": [4, 4, 8, 8]},
        "stages": [{"width": 8, "downsample": None,
                    "blocks": [{"type": "shsa", "pdim": 4, "qk_dim": 4, "ffn_hidden": 16}]}]},
    "deit": {
        "family": "deit", "input_size": 16, "num_classes": 7, "distillation": True, "stem": {"patch_size": 8},
        "stages": [{"width": 8, "blocks": [{"type": "vit", "heads": 2, "qk_dim": 4, "v_dim": 4, "ffn_hidden": 16}]}]},
    "swin": {
        "family": "swin", "input_size": 16, "num_classes": 7, "stem": {"patch_size": 4},
        "stages": [{"width": 8, "window_size": 2,
                    "blocks": [{"type": "swin", "heads": 2, "qk_dim": 4, "v_dim": 4, "ffn_hidden": 16}] * 2}]},
}


def _heads(model):
    got = model.get_classifier()
    return list(got) if isinstance(got, tuple) else [got]


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_a_frozen_backbone_with_a_new_head_trains_saves_and_rebuilds(family, tmp_path):
    torch.manual_seed(0)
    a = vitslim.resolve_arch(ARCHS[family])
    model = vitslim.build_model(a)
    old = _heads(model)
    assert len(old) == (2 if a["distillation"] else 1)
    assert all(isinstance(h, torch.nn.Module) for h in old)

    model.requires_grad_(False)
    model.reset_classifier(3)
    new = _heads(model)
    assert len(new) == len(old) and all(n is not o for n, o in zip(new, old))
    assert model.arch["num_classes"] == 3 and a["num_classes"] == 7  # the arch it was built from is not changed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, p in model.named_parameters()
                                       if any(p is q for h in new for q in h.parameters())}

    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] not in ("head", "head_dist", "dist_head")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, a["in_chans"], a["input_size"], a["input_size"])
    y = torch.tensor([0, 1, 2, 0])
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in frozen.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BatchNorm still updates
            assert torch.equal(model.state_dict()[k], v), k

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 3)
    rebuilt = vitslim.build_model(model.arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    vitslim.save_checkpoint(model, model.arch, tmp_path / "m.pt")
    loaded, arch = vitslim.load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out) and torch.equal(loaded(x), out)
    assert arch["num_classes"] == 3


def test_the_new_head_has_the_old_ones_dtype():
    model = vitslim.build_model(ARCHS["deit"]).double()
    model.reset_classifier(4)
    assert {p.dtype for h in _heads(model) for p in h.parameters()} == {torch.float64}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).shape == (2, 4)


@pytest.mark.parametrize("value, expected", [
    (0, "num_classes: got 0, expected an integer >= 1 (forward_features gives the features)"),
    (-2, "num_classes: got -2, expected an integer >= 1"),
    ("10", "num_classes: got '10', expected an integer"),
])
def test_a_bad_class_count_is_one_line_naming_it(value, expected):
    model = vitslim.build_model(ARCHS["swin"])
    with pytest.raises(vitslim.ArchError) as e:
        model.reset_classifier(value)
    assert str(e.value) == expected
    assert model.arch["num_classes"] == 7 and model.get_classifier().fc.out_features == 7
