"""Which attention path is fastest on CPU when a pruned block has qk_dim != v_dim?
PyTorch's fused SDPA kernel wants equal widths; compare it with explicit softmax(q k^T) v and with
zero-padding q, k up to v_dim (same result), at batch 1 and 16, in one interleaved run.
Usage: python benchmarks/attention_dispatch.py
"""
import argparse
import torch, time, torch.nn.functional as F
argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Usage: python benchmarks/attention_dispatch.py "
                        "(no options; one thread, prints one line per batch size)").parse_args()
torch.set_num_threads(1)
def explicit(q,k,v,s): return ((q@k.transpose(-2,-1))*s).softmax(-1)@v
def pad(q,k,v,s):
    d=v.shape[-1]-q.shape[-1]
    return F.scaled_dot_product_attention(F.pad(q,(0,d)),F.pad(k,(0,d)),v,scale=s)
def sdpa(q,k,v,s): return F.scaled_dot_product_attention(q,k,v,scale=s)
for B in (1,16):
    q=torch.randn(B,3,197,7); k=torch.randn(B,3,197,7); v=torch.randn(B,3,197,55)
    fns={'sdpa':sdpa,'explicit':explicit,'pad':pad}
    res={n:[] for n in fns}
    with torch.inference_mode():
        for r in range(30):
            for n,f in fns.items():
                t=time.perf_counter(); f(q,k,v,0.125); res[n].append(time.perf_counter()-t)
    import statistics
    med={n:statistics.median(x)*1e3 for n,x in res.items()}
    print(B, {n:round(m,3) for n,m in med.items()}, 'ratio explicit/sdpa', round(med['explicit']/med['sdpa'],2), 'pad/sdpa', round(med['pad']/med['sdpa'],2))
