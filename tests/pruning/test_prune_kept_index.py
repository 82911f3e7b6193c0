"""report.json names, per block and stage, the unpruned model's indices of what the pruned model kept."""
import json

import torch

from pruning.pruner import PruneConfig, prune
from pruning_nets import batches, build, tiny_deit


def test_report_names_the_original_indices_every_block_kept():
    """NViT / Torch-Pruning users map a pruned model back onto the original: blocks[*].kept_index and
    stages[*].kept_index are in the unpruned model's numbering, composed over iterative steps and embedding
    pruning; without fine-tuning every pruned weight is the original's slice at those indices."""
    arch = tiny_deit(blocks=2, heads=3, qk=8, v=8, ffn=64)
    model = build(arch)
    cfg = PruneConfig(target="macs=0.45", iterative_steps=2, prune_embed=True, calib_batches=2, eval_batches=0)
    res = prune(model, arch, cfg, calibration=batches(arch, 2))
    assert "_kept" not in json.dumps(res.report["steps"])
    emb = res.report["stages"][0]["kept_index"]
    assert len(emb) == res.arch["stages"][0]["width"] < arch["stages"][0]["width"]
    sd0, sd1 = model.state_dict(), res.model.state_dict()
    H, Q, V = 3, 8, 8
    for b, blk in enumerate(res.report["blocks"]):
        k = blk["kept_index"]
        assert len(k["heads"]) == blk["heads"] and all(len(q) == blk["qk_dim"] for q in k["qk"])
        rows = [h * Q + c for h, cs in zip(k["heads"], k["qk"]) for c in cs]            # q
        rows += [H * Q + h * Q + c for h, cs in zip(k["heads"], k["qk"]) for c in cs]   # k
        rows += [2 * H * Q + h * V + c for h, cs in zip(k["heads"], k["v"]) for c in cs]  # v
        w0 = sd0[f"blocks.{b}.attn.qkv.weight"][rows][:, emb]
        assert torch.equal(sd1[f"blocks.{b}.attn.qkv.weight"], w0), b
        assert torch.equal(sd1[f"blocks.{b}.mlp.fc1.weight"], sd0[f"blocks.{b}.mlp.fc1.weight"][k["ffn"]][:, emb]), b
