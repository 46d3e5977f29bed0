"""Which walk/compact configs give wrong results on (4096, 11008) / (4096, 14336)? (device diagnostic)"""
import itertools
import torch
from vllm_rsparse import launchers, reference

torch.manual_seed(0)
for n, k in [(4096, 11008), (4096, 14336), (4096, 4096)]:
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    thr = torch.quantile(x.float().abs().flatten(), 0.5).reshape(1)
    ref = reference.sparse_linear(x, w, b, threshold=thr).float()
    w_t = launchers.prepare_weight(w).t()
    for kernel, bn, bk, split, warps, stages in itertools.product(
            ["walk", "compact"], [64, 128], [32, 64, 128], [1, 4, 11, 28], [4, 8], [1, 2]):
        cfg = launchers.GemvConfig(1, bn, bk, split, warps, stages, kernel=kernel)
        out = launchers.sparse_gemv(x, w_t, thr, None, b, None, None, None, cfg).float()
        out2 = launchers.sparse_gemv(x, w_t, thr, None, b, None, None, None, cfg).float()
        err = (out - ref).abs().max().item()
        err2 = (out2 - ref).abs().max().item()
        ws = launchers._workspace_for(x.device)
        dirty = not ws.is_clean()
        if err > 0.05 or err2 > 0.05 or dirty:
            print(f"BAD N{n} K{k} {cfg} err {err:.3g} {err2:.3g} dirty {dirty}", flush=True)
            ws.accumulator.zero_(); ws.counters.zero_(); ws.fixed.zero_()
    print(f"done N{n} K{k}", flush=True)
