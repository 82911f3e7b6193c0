"""Run with PYTHONPATH=<old worktree>: writes the compat fixtures into OUT (argv[1]) with that commit's code."""
import json, os, shutil, sys
import torch, yaml
import vitslim
from supernet.train import TrainConfig, train
from supernet.space import load_space
from latency_tables import LatencyTable

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
exp = {}


def logits(model, arch):
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, arch.get("in_chans", 3), arch["input_size"], arch["input_size"], generator=g)
    with torch.no_grad():
        y = model(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return [round(float(v), 6) for v in y.flatten()]


# 1. a tiny EfficientFormer (search result shape: meta4d, meta3d, identity, conv downsamples) and a tiny DeiT
#    with qk_dim != v_dim and a pruned-away FFN (prune result shape)
ef = {"version": 1, "family": "efficientformer", "input_size": 32, "in_chans": 3, "num_classes": 4,
      "distillation": False, "stem": {"widths": [8, 8]},
      "stages": [{"width": 8, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 8}, {"type": "identity"}]},
                 {"width": 8, "downsample": {"type": "conv"}, "blocks": [{"type": "identity"}]},
                 {"width": 16, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 16}]},
                 {"width": 16, "downsample": {"type": "conv"},
                  "blocks": [{"type": "meta4d", "ffn_hidden": 16},
                             {"type": "meta3d", "heads": 2, "qk_dim": 4, "v_dim": 8, "ffn_hidden": 32}]}]}
deit = vitslim.get_preset("deit_tiny")
deit.update(input_size=16, num_classes=4)
deit["stem"]["patch_size"] = 4
st = deit["stages"][0]
st["width"] = 16
b = dict(st["blocks"][0])
st["blocks"] = [dict(b, heads=2, qk_dim=4, v_dim=8, ffn_hidden=32), dict(b, heads=1, qk_dim=8, v_dim=8, ffn_hidden=0)]
for name, arch in (("efficientformer", ef), ("deit", deit)):
    torch.manual_seed(0)
    arch = vitslim.build_model(arch).arch if hasattr(vitslim.build_model(arch), "arch") else arch
    torch.manual_seed(0)
    m = vitslim.build_model(arch)
    vitslim.save_checkpoint(m, arch, os.path.join(out, f"{name}_model.pt"))
    vitslim.save_arch(arch, os.path.join(out, f"{name}_arch.yaml"))
    exp[f"{name}_model.pt"] = {"logits": logits(m, arch), "params": sum(p.numel() for p in m.parameters()),
                               "count": vitslim.count(arch)}

# 2. a micro supernet run, interrupted at step 2 of 3 (checkpoint every step), and the same run finished
space = {"version": 1, "name": "micro", "family": "efficientformer", "input_size": 32, "num_classes": 4,
         "distillation": False, "width_step": 8, "ffn_ratio": 1, "attention": {"heads": 1, "qk_dim": 8, "v_dim": 8},
         "stages": [{"max_depth": 1, "max_width": 8, "min_width": 8, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 1, "max_width": 8, "min_width": 8, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 1, "max_width": 8, "min_width": 8, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 1, "max_width": 16, "min_width": 8, "candidates": ["meta4d", "meta3d", "identity"]}]}
cfg = {"version": 1, "space": space, "seed": 0, "steps": 3, "batch_size": 4, "mode": "hard", "widths": "random",
       "data": {"type": "synthetic", "train_size": 32, "heldout_size": 8},
       "optimizer": {"lr": 0.002, "warmup_steps": 1}, "alpha": {"lr": 0.3, "start_step": 0},
       "temperature": {"start": 3.0, "end": 1.0}, "checkpoint_every": 1, "log_every": 1, "eval_every": 0,
       "eval_batches": 1, "threads": 1}
with open(os.path.join(out, "supernet_config.yaml"), "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
c = TrainConfig.from_dict(cfg)
train(c, os.path.join(out, "supernet_run"), progress=False, stop_at=2)
tmp = os.path.join(out, "_full")
train(c, tmp, progress=False)
full = torch.load(os.path.join(tmp, "checkpoint.pt"), weights_only=True)
exp["supernet_run"] = {"step": 2, "steps": 3, "final_weight_abs_sums": {k: float(v.double().abs().sum())
                       for k, v in full["model"].items() if v.is_floating_point()},
                       "final_metrics_losses": [json.loads(l)["loss"] for l in open(os.path.join(tmp, "metrics.jsonl"))]}
shutil.rmtree(tmp)

# 3. the latency table, and what it predicts for the EfficientFormer above
tbl = sys.argv[2]
shutil.copy(tbl, os.path.join(out, "latency_table.yaml"))
t = LatencyTable.load(os.path.join(out, "latency_table.yaml"))
sp = load_space(os.path.join(os.path.dirname(tbl), "tiny_space.yaml"))
probe = sp.to_arch({"widths": [16, 32, 48, 64], "blocks": [["meta4d", "identity"], ["identity", "meta4d"],
                                                             ["meta4d", "meta3d", "identity"], ["meta3d", "identity", "identity"]]})
vitslim.save_arch(probe, os.path.join(out, "latency_probe_arch.yaml"))
exp["latency_table.yaml"] = {"predicted_ms": t.predict(probe), "entries": len(t.entries)}
json.dump(exp, open(os.path.join(out, "expected.json"), "w"), indent=1, sort_keys=True)
print("ok")
