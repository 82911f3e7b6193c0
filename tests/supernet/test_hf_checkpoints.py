"""Hugging Face transformers checkpoints (ViT, DeiT plain and distilled, Swin): random weights in HF's
key layout, checked against a plain-torch forward written from transformers' modeling_vit.py /
modeling_deit.py / modeling_swin.py (separate query/key/value, HF's window partition, mask and 2x2
merging order), so no transformers install is needed."""
import json
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import vitslim
from supernet.errors import CheckpointError
from supernet.safetensors_io import write_safetensors
from vitslim.cli import main

G = torch.Generator().manual_seed(0)


def rnd(*shape, std=0.1):
    return torch.randn(*shape, generator=G) * std


# ---------------------------------------------------------------- HF-layout state dicts (4.x hub key names)
def hf_vit_sd(prefix="vit", width=48, depth=2, patch=8, size=32, classes=10, hidden=192, tokens=1,
              heads_out=("classifier",), seed=0):
    G.manual_seed(seed)  # the same weights whichever tests run
    D, n = width, (size // patch) ** 2 + tokens
    e = f"{prefix}.embeddings."
    sd = {e + "cls_token": rnd(1, 1, D), e + "position_embeddings": rnd(1, n, D),
          e + "patch_embeddings.projection.weight": rnd(D, 3, patch, patch), e + "patch_embeddings.projection.bias": rnd(D)}
    if tokens == 2:
        sd[e + "distillation_token"] = rnd(1, 1, D)
    for i in range(depth):
        p = f"{prefix}.encoder.layer.{i}."
        for nm in ("query", "key", "value"):
            sd[p + f"attention.attention.{nm}.weight"], sd[p + f"attention.attention.{nm}.bias"] = rnd(D, D), rnd(D)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = rnd(D, D), rnd(D)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = rnd(hidden, D), rnd(hidden)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rnd(D, hidden), rnd(D)
        for nm in ("layernorm_before", "layernorm_after"):
            sd[p + nm + ".weight"], sd[p + nm + ".bias"] = 1 + rnd(D), rnd(D)
    sd[f"{prefix}.layernorm.weight"], sd[f"{prefix}.layernorm.bias"] = 1 + rnd(D), rnd(D)
    for h in heads_out:
        sd[h + ".weight"], sd[h + ".bias"] = rnd(classes, D), rnd(classes)
    return sd


def hf_swin_sd(embed=12, depths=(2, 2), heads=(2, 4), window=4, patch=2, classes=7, index=True, seed=0):
    G.manual_seed(seed)
    sd = {"swin.embeddings.patch_embeddings.projection.weight": rnd(embed, 3, patch, patch),
          "swin.embeddings.patch_embeddings.projection.bias": rnd(embed),
          "swin.embeddings.norm.weight": 1 + rnd(embed), "swin.embeddings.norm.bias": rnd(embed)}
    dim = embed
    for i, (d, h) in enumerate(zip(depths, heads)):
        for j in range(d):
            p = f"swin.encoder.layers.{i}.blocks.{j}."
            for nm in ("layernorm_before", "layernorm_after"):
                sd[p + nm + ".weight"], sd[p + nm + ".bias"] = 1 + rnd(dim), rnd(dim)
            for nm in ("query", "key", "value"):
                sd[p + f"attention.self.{nm}.weight"], sd[p + f"attention.self.{nm}.bias"] = rnd(dim, dim), rnd(dim)
            sd[p + "attention.self.relative_position_bias_table"] = rnd((2 * window - 1) ** 2, h, std=0.5)
            if index:  # transformers 4.x saved the index buffer; 5.x does not
                sd[p + "attention.self.relative_position_index"] = torch.zeros(window ** 4, dtype=torch.long)
            sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = rnd(dim, dim), rnd(dim)
            sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = rnd(4 * dim, dim), rnd(4 * dim)
            sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rnd(dim, 4 * dim), rnd(dim)
        if i < len(depths) - 1:  # HF: downsample at the END of a stage
            p = f"swin.encoder.layers.{i}.downsample."
            sd[p + "reduction.weight"] = rnd(2 * dim, 4 * dim)
            sd[p + "norm.weight"], sd[p + "norm.bias"] = 1 + rnd(4 * dim), rnd(4 * dim)
            dim *= 2
    sd["swin.layernorm.weight"], sd["swin.layernorm.bias"] = 1 + rnd(dim), rnd(dim)
    sd["classifier.weight"], sd["classifier.bias"] = rnd(classes, dim), rnd(classes)
    return sd


def to_v5_names(sd):
    """The names transformers 5.x modules use in memory (a user's torch.save(model.state_dict()))."""
    out = {}
    for k, v in sd.items():
        k = k.replace("encoder.layer.", "layers.")
        for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                         ("attention.attention.value", "attention.v_proj"), ("attention.self.query", "attention.q_proj"),
                         ("attention.self.key", "attention.k_proj"), ("attention.self.value", "attention.v_proj"),
                         ("attention.self.relative_position_bias_table",
                          "attention.relative_position_bias.relative_position_bias_table"),
                         ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
            k = k.replace(old, new)
        if not k.endswith("relative_position_index"):
            out[k] = v
    return out


# ---------------------------------------------------------------- reference forwards (HF's, in plain torch)
def _attend(x, sd, p, heads, bias=None):
    """HF attention: separate q/k/v Linears, view(..., heads, head_dim), eager softmax, output.dense."""
    B, N, C = x.shape
    d = sd[p + "query.weight"].shape[0] // heads
    q, k, v = (F.linear(x, sd[p + f"{n}.weight"], sd[p + f"{n}.bias"]).view(B, N, heads, d).transpose(1, 2)
               for n in ("query", "key", "value"))
    a = q @ k.transpose(2, 3) * d ** -0.5
    if bias is not None:
        a = a + bias
    return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)


def hf_vit_forward(sd, x, prefix, heads, eps, patch):
    pre = prefix + "."
    e = pre + "embeddings."
    h = F.conv2d(x, sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2)
    toks = [sd[e + "cls_token"].expand(len(x), -1, -1)]
    if e + "distillation_token" in sd:
        toks.append(sd[e + "distillation_token"].expand(len(x), -1, -1))
    h = torch.cat(toks + [h], 1) + sd[e + "position_embeddings"]
    D = h.shape[-1]
    i = 0
    while f"{pre}encoder.layer.{i}.layernorm_before.weight" in sd:
        p = f"{pre}encoder.layer.{i}."
        y = F.layer_norm(h, (D,), sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], eps)
        y = _attend(y, sd, p + "attention.attention.", heads)
        h = F.linear(y, sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"]) + h
        y = F.layer_norm(h, (D,), sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"], eps)
        y = F.gelu(F.linear(y, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + h
        i += 1
    h = F.layer_norm(h, (D,), sd[pre + "layernorm.weight"], sd[pre + "layernorm.bias"], eps)
    if "cls_classifier.weight" in sd:  # DeiTForImageClassificationWithTeacher: mean of both heads
        return (F.linear(h[:, 0], sd["cls_classifier.weight"], sd["cls_classifier.bias"])
                + F.linear(h[:, 1], sd["distillation_classifier.weight"], sd["distillation_classifier.bias"])) / 2
    return F.linear(h[:, 0], sd["classifier.weight"], sd["classifier.bias"])


def _hf_window_partition(x, w):
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(-1, w, w, C)


def _hf_window_reverse(x, w, H, W):
    C = x.shape[-1]
    return x.view(-1, H // w, W // w, w, w, C).transpose(2, 3).reshape(-1, H, W, C)


def _hf_rel_index(w):
    c = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    r = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0)
    r[:, :, 0] += w - 1
    r[:, :, 1] += w - 1
    r[:, :, 0] *= 2 * w - 1
    return r.sum(-1)


def _hf_mask(H, W, w, s):
    """HF's get_attn_mask: 3 regions per axis by slices, -100 between different regions."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    m = _hf_window_partition(img, w).view(-1, w * w)
    m = m.unsqueeze(1) - m.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def hf_swin_forward(sd, x, window, patch, eps=1e-5):
    e = "swin.embeddings."
    h = F.conv2d(x, sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"], stride=patch)
    B, C, H, W = h.shape
    h = h.flatten(2).transpose(1, 2)
    h = F.layer_norm(h, (C,), sd[e + "norm.weight"], sd[e + "norm.bias"])  # default eps, as HF's embeddings.norm
    i = 0
    while f"swin.encoder.layers.{i}.blocks.0.layernorm_before.weight" in sd:
        j = 0
        while f"swin.encoder.layers.{i}.blocks.{j}.layernorm_before.weight" in sd:
            p = f"swin.encoder.layers.{i}.blocks.{j}."
            w, s = window, (0 if j % 2 == 0 else window // 2)
            if min(H, W) <= w:  # HF set_shift_and_window_size
                s, w = 0, min(H, W)
            table = sd[p + "attention.self.relative_position_bias_table"]
            heads = table.shape[1]
            short = h
            y = F.layer_norm(h, (C,), sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], eps)
            y = y.view(B, H, W, C)
            if s:
                y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            win = _hf_window_partition(y, w).view(-1, w * w, C)
            bias = table[_hf_rel_index(w).view(-1)].view(w * w, w * w, -1).permute(2, 0, 1).unsqueeze(0)
            if s:
                m = _hf_mask(H, W, w, s)
                bias = bias + m.unsqueeze(1).unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(-1, 1, w * w, w * w)
            o = _attend(win, sd, p + "attention.self.", heads, bias)
            o = F.linear(o, sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"])
            o = _hf_window_reverse(o.view(-1, w, w, C), w, H, W)
            if s:
                o = torch.roll(o, shifts=(s, s), dims=(1, 2))
            h = short + o.reshape(B, H * W, C)
            y = F.layer_norm(h, (C,), sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"], eps)
            y = F.gelu(F.linear(y, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
            h = F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + h
            j += 1
        p = f"swin.encoder.layers.{i}.downsample."
        if p + "reduction.weight" in sd:  # SwinPatchMerging: cat over col, then row: (0,0), (1,0), (0,1), (1,1)
            y = h.view(B, H, W, C)
            y = torch.cat([y[:, r::2, c::2, :] for c in range(2) for r in range(2)], -1)
            H, W = H // 2, W // 2
            y = F.layer_norm(y.view(B, H * W, 4 * C), (4 * C,), sd[p + "norm.weight"], sd[p + "norm.bias"])
            h = F.linear(y, sd[p + "reduction.weight"])
            C = h.shape[-1]
        i += 1
    h = F.layer_norm(h, (C,), sd["swin.layernorm.weight"], sd["swin.layernorm.bias"], eps)
    return F.linear(h.mean(1), sd["classifier.weight"], sd["classifier.bias"])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def save(sd, path, config=None):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".safetensors"):
        write_safetensors({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    if config is not None:
        with open(path.rsplit("/", 1)[0] + "/config.json", "w") as f:
            json.dump(config, f)
    return path


def heads3(kind):
    """config.json of a 3-head model (48 wide: without it the head count is guessed, with a warning)."""
    return {"model_type": kind, "num_attention_heads": 3}


X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- 1. ViT / DeiT
@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.safetensors"])
def test_hf_vit_loads_and_matches_the_hf_forward(tmp_path, fname):
    sd = hf_vit_sd("vit")
    model, arch = vitslim.load_checkpoint(save(sd, tmp_path / fname, heads3("vit")))
    assert arch["family"] == "deit" and not arch["distillation"]
    assert (arch["input_size"], arch["stem"]["patch_size"], arch["num_classes"]) == (32, 8, 10)
    assert [b["heads"] for b in arch["stages"][0]["blocks"]] == [3, 3]
    with torch.no_grad():
        out = model(X32)
        # vitslim's DeiT normalises with timm's eps 1e-6: the same network at that eps, to float rounding
        assert rel_err(out, hf_vit_forward(sd, X32, "vit", 3, 1e-6, 8)) < 1e-5
        # HF's default layer_norm_eps 1e-12: LayerNorm inputs here have variance ~0.2-1, so the eps shifts each
        # normalisation by ~1e-6 relative; measured 1.1e-5 over the whole net (2.1e-5 distilled), bound 1e-4 (trained weights,
        # with far larger activations, are closer)
        assert rel_err(out, hf_vit_forward(sd, X32, "vit", 3, 1e-12, 8)) < 1e-4


def test_hf_vit_pooler_is_dropped_and_v5_names_load_the_same(tmp_path):
    sd = hf_vit_sd("vit")
    with_pooler = {**sd, "vit.pooler.dense.weight": rnd(48, 48), "vit.pooler.dense.bias": rnd(48)}
    with pytest.warns(UserWarning, match="no config.json with num_attention_heads .*: 3 heads of 16 channels guessed"):
        m1, a1 = vitslim.load_checkpoint(save(with_pooler, tmp_path / "a.bin"))
    m2, a2 = vitslim.load_checkpoint(save(to_v5_names(sd), tmp_path / "b" / "b.bin", heads3("vit")))
    assert a1 == a2
    with torch.no_grad():
        assert torch.equal(m1(X32), m2(X32))


def test_hf_distilled_deit_averages_both_heads_like_the_hf_teacher_model(tmp_path):
    sd = hf_vit_sd("deit", tokens=2, heads_out=("cls_classifier", "distillation_classifier"))
    model, arch = vitslim.load_checkpoint(save(sd, tmp_path / "model.safetensors", heads3("deit")))
    assert arch["distillation"] and arch["input_size"] == 32
    with torch.no_grad():
        assert rel_err(model(X32), hf_vit_forward(sd, X32, "deit", 3, 1e-6, 8)) < 1e-5


def test_hf_plain_deit_keeps_its_distillation_token_with_one_effective_head(tmp_path):
    """DeiTForImageClassification runs cls + distillation tokens but classifies the cls token alone."""
    sd = hf_vit_sd("deit", tokens=2, heads_out=("classifier",))
    with pytest.warns(UserWarning, match="DeiTForImageClassification .* same logits"):
        model, arch = vitslim.load_checkpoint(save(sd, tmp_path / "pytorch_model.bin", heads3("deit")))
    assert arch["distillation"]
    assert torch.equal(model.head.weight, 2 * sd["classifier.weight"]) and not model.head_dist.weight.any()
    with torch.no_grad():
        assert rel_err(model(X32), hf_vit_forward(sd, X32, "deit", 3, 1e-6, 8)) < 1e-5


def test_hf_config_json_gives_heads_the_tensors_do_not_record(tmp_path):
    sd = hf_vit_sd("vit", width=48)  # 48 wide: timm's guess is 3 heads of 16
    cfg = {"model_type": "vit", "num_attention_heads": 6, "image_size": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    model, arch = vitslim.load_checkpoint(save(sd, tmp_path / "model.safetensors", cfg))
    assert [(b["heads"], b["qk_dim"]) for b in arch["stages"][0]["blocks"]] == [(6, 8), (6, 8)]
    with torch.no_grad():
        assert rel_err(model(X32), hf_vit_forward(sd, X32, "vit", 6, 1e-6, 8)) < 1e-5


# ---------------------------------------------------------------- 2. Swin
@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.safetensors"])
def test_hf_swin_loads_and_matches_the_hf_forward(tmp_path, fname):
    sd = hf_swin_sd()
    cfg = {"model_type": "swin", "image_size": 32, "window_size": 4, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
    model, arch = vitslim.load_checkpoint(save(sd, tmp_path / fname, cfg))
    assert arch["family"] == "swin" and arch["input_size"] == 32 and arch["num_classes"] == 7
    assert [(st["width"], st["window_size"], [b["heads"] for b in st["blocks"]]) for st in arch["stages"]] == \
        [(12, 4, [2, 2]), (24, 4, [4, 4])]
    with torch.no_grad():
        # same LayerNorm eps (1e-5), shifted-window mask and 2x2 merging order (random reduction weights would
        # tell any other order apart): equal to float rounding
        assert rel_err(model(X32), hf_swin_forward(sd, X32, 4, 2)) < 1e-5


def test_hf_swin_three_stages_window_clamped_in_the_last_and_v5_names(tmp_path):
    """Sides 16, 8, 4 at 32 px with window 4: the last stage's window covers it, no shift (HF and vitslim)."""
    sd = hf_swin_sd(depths=(2, 2, 2), heads=(2, 4, 3), index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no config.json: nothing to warn about
        model, arch = vitslim.load_checkpoint(save(to_v5_names(sd), tmp_path / "model.safetensors"))
    assert arch["input_size"] == 224  # the tensors do not record it; the model runs at any size
    with torch.no_grad():
        assert rel_err(model(X32), hf_swin_forward(sd, X32, 4, 2)) < 1e-5


# ---------------------------------------------------------------- 3. errors and the command line
@pytest.mark.parametrize("edit, needle", [
    (lambda sd: {k.replace("swin.", "swinv2.", 1): v for k, v in sd.items()},
     r"model prefix 'swinv2\.'\) that vitslim does not read, expected one of ViTForImageClassification"),
    (lambda sd: {k[len("swin."):] if k.startswith("swin.") else k: v for k, v in sd.items()},
     r"a bare backbone \(no model prefix, no classifier\)"),
    (lambda sd: {**sd, "swin.embeddings.position_embeddings": torch.zeros(1, 256, 12)},
     r"swin\.embeddings\.position_embeddings \(absolute position embeddings"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("classifier")},
     r"a Hugging Face transformers swin backbone without a classifier \(e\.g\. SwinModel\)"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("query.bias")},
     r"has no attention query bias, expected query, key and value"),
])
def test_unsupported_hf_layouts_fail_in_one_line_naming_what_is_supported(tmp_path, edit, needle):
    p = save(edit(hf_swin_sd()), tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match=needle) as e:
        vitslim.load_checkpoint(p)
    assert "\n" not in str(e.value) and str(e.value).startswith(p)


def test_hf_masked_image_modeling_and_non_gelu_configs_are_refused(tmp_path):
    sd = {**hf_vit_sd("vit"), "decoder.0.weight": rnd(192, 48, 1, 1), "vit.embeddings.mask_token": rnd(1, 1, 48)}
    with pytest.raises(CheckpointError, match=r"keys vitslim does not read: .*\(a mask token"):
        vitslim.load_checkpoint(save(sd, tmp_path / "mim.bin"))
    p = save(hf_vit_sd("vit"), tmp_path / "m.bin", {"model_type": "vit", "hidden_act": "gelu_new"})
    with pytest.raises(CheckpointError, match=r"config\.json hidden_act 'gelu_new', expected 'gelu'"):
        vitslim.load_checkpoint(p)


def test_info_reads_an_hf_checkpoint(tmp_path, capsys):
    p = save(hf_vit_sd("deit", tokens=2, heads_out=("cls_classifier", "distillation_classifier")), tmp_path / "hf.bin",
             heads3("deit"))
    code = main(["info", p, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["family"] == "deit" and d["input_size"] == 32 and d["params"] == sum(
        v.numel() for k, v in torch.load(p, weights_only=True).items())


def test_hf_swin_config_values_that_change_the_logits_are_warned_about_and_a_wild_size_refused(tmp_path):
    """HF pads a feature map before its shifted windows, vitslim (timm) after: other logits where a side is not a
    window multiple; a larger layer_norm_eps than vitslim's; an image_size that would leave a stage without a
    token or allocate gigabytes of masks."""
    sd = hf_swin_sd()  # patch 2, window 4, 2 stages
    base = {"model_type": "swin", "window_size": 4, "hidden_act": "gelu"}
    with pytest.warns(UserWarning, match=r"image_size 40 gives Swin feature maps that are not window multiples "
                                         r"\(stage 1: 10x10, window 4\)"):  # stage 0: 20x20, a multiple
        vitslim.load_checkpoint(save(sd, tmp_path / "a" / "model.bin", dict(base, image_size=40)))
    with pytest.warns(UserWarning, match=r"layer_norm_eps 0.001, vitslim's swin LayerNorms use 1e-05"):
        vitslim.load_checkpoint(save(sd, tmp_path / "b" / "model.bin", dict(base, image_size=32, layer_norm_eps=1e-3)))
    for size in (1, 100000):
        with pytest.raises(vitslim.CheckpointError, match=rf"config.json image_size {size}, expected 4 to 4096"):
            vitslim.load_checkpoint(save(sd, tmp_path / f"c{size}" / "model.bin", dict(base, image_size=size)))


def test_an_unpruned_hf_swin_with_other_head_widths_per_stage_is_not_called_pruned(tmp_path):
    import warnings
    sd = hf_swin_sd(embed=12, heads=(2, 6))  # 6 and 4 channels per head: stage by stage, as built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitslim.load_checkpoint(save(sd, tmp_path / "model.bin", {"model_type": "swin", "image_size": 32}))


def test_a_swin_stage_without_a_shifted_block_is_not_warned_about_at_any_size(tmp_path):
    """Padding before or after the shift differs only in shifted blocks: a one-block stage has none, so a side
    that is not a window multiple gives the same logits there (stage 1 here: 10 x 10, window 4, one block)."""
    import warnings
    sd = hf_swin_sd(depths=(2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, arch = vitslim.load_checkpoint(save(sd, tmp_path / "model.bin", {"model_type": "swin", "image_size": 40}))
    assert arch["input_size"] == 40


def test_hf_config_values_read_as_written_and_warned_about_only_where_logits_differ(tmp_path):
    """image_size as a [h, w] pair; a stage side below its window (the window shrinks to it, no shift, in HF as in
    vitslim) is not warned about; a ViT / DeiT layer_norm_eps above 1e-5 is; a wide ViT of a width released
    models use (>= 1280, a multiple of 16) gets timm's head guess without a warning."""
    import warnings
    from supernet import hf_layouts
    _, arch = vitslim.load_checkpoint(save(hf_swin_sd(), tmp_path / "a" / "model.bin",
                                           {"model_type": "swin", "image_size": [32, 32]}))
    assert arch["input_size"] == 32
    # patch 2, window 8, two stages of two blocks at 20 px: sides 10 (not a multiple of 8) and 5 (below 8)
    out = {"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2)}
    for i in range(2):
        for j in range(2):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"] = torch.zeros(15 * 15, 2)
    with pytest.warns(UserWarning, match=r"image_size 20 gives Swin feature maps that are not window multiples "
                                         r"\(stage 0: 10x10, window 8\): ") as rec:
        hf_layouts._warn_swin_padding(out, 20, "m.bin")
    assert len(rec) == 1 and "stage 1" not in str(rec[0].message)  # 5x5, below its window: the same logits
    with pytest.warns(UserWarning, match=r"layer_norm_eps 5e-05, vitslim's vit LayerNorms use 1e-06"):
        vitslim.load_checkpoint(save(hf_vit_sd("vit"), tmp_path / "c" / "model.bin",
                                     {"model_type": "vit", "layer_norm_eps": 5e-5, "num_attention_heads": 3}))
    wide = {"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(1296, 3, 16, 16),
            "classifier.weight": torch.zeros(2, 1296)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, hints = hf_layouts.convert(wide, str(tmp_path / "none" / "model.bin"))
    assert hints == {} and out["head.weight"].shape == (2, 1296)
    # a config.json of another model type beside the file is not this model's: ignored
    with pytest.warns(UserWarning, match=r"no config.json with num_attention_heads .*3 heads of 16 channels guessed"):
        _, arch = vitslim.load_checkpoint(save(hf_vit_sd("vit"), tmp_path / "d" / "model.bin",
                                               {"model_type": "bert", "hidden_act": "relu", "num_attention_heads": 6}))
    assert [b["heads"] for b in arch["stages"][0]["blocks"]] == [3, 3]  # timm's guess for width 48, not 6


def test_a_config_json_nested_past_the_recursion_limit_is_ignored_with_a_warning(tmp_path):
    """config.json comes from the hub: '[[[[...' made json raise RecursionError through load_checkpoint."""
    path = save(hf_vit_sd("vit"), tmp_path / "model.bin")
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.warns(UserWarning) as caught:  # one block: pytest before 8 does not pass warnings on to an outer one
        _, arch = vitslim.load_checkpoint(path)
    said = [str(w.message) for w in caught]
    assert any(re.search(r"config.json: not readable JSON \(RecursionError\), ignored", m) for m in said), said
    assert any("3 heads of 16 channels guessed from the width 48" in m for m in said), said  # then, without its heads
    assert arch["family"] == "deit"


@pytest.mark.parametrize("kind, field, value, needle", [
    ("vit", "num_attention_heads", "3", "num_attention_heads '3', expected a positive integer that divides the width 48"),
    ("vit", "num_attention_heads", 0, "num_attention_heads 0, expected a positive integer"),
    ("vit", "num_attention_heads", -3, "num_attention_heads -3, expected a positive integer"),
    ("vit", "num_attention_heads", 5, "num_attention_heads 5, expected a positive integer that divides the width 48"),
    ("vit", "num_attention_heads", [3], "num_attention_heads [3], expected a positive integer"),
    ("deit", "num_attention_heads", True, "num_attention_heads True, expected a positive integer"),
    ("swin", "image_size", "32", "image_size '32', expected an integer (or a square [n, n] pair)"),
    ("swin", "image_size", [32, 64], "image_size [32, 64], expected an integer (or a square [n, n] pair)"),
    ("swin", "image_size", 32.0, "image_size 32.0, expected an integer"),
    ("swin", "image_size", True, "image_size True, expected an integer"),
    ("swin", "image_size", 0, "image_size 0, expected 4 to 4096"),
    ("swin", "image_size", -32, "image_size -32, expected 4 to 4096"),
])
def test_a_config_json_field_of_the_wrong_type_or_size_is_refused_in_one_line(tmp_path, kind, field, value, needle):
    """A field config.json has but that cannot be right was ignored silently (the heads guessed from the width
    instead, the image size taken from nothing): the file is refused, naming the field and what it should be."""
    sd = hf_swin_sd() if kind == "swin" else hf_vit_sd(kind)
    path = save(sd, tmp_path / "model.bin", {"model_type": kind, field: value})
    with pytest.raises(vitslim.CheckpointError) as e:
        vitslim.load_checkpoint(path)
    assert f"config.json {needle}" in str(e.value) and "\n" not in str(e.value)
