"""XLA:CPU vs PyTorch (oneDNN/MKL) on the kernels that dominate the bench shape's train step.

    python benchmarks/cpu_kernels.py

The bench shape's LM head (1024 tokens x 512 -> 151,936) is three quarters of the train step's
FLOPs: its forward GEMM, the two backward GEMMs (dh = g W^T, dW = h^T g) and the softmax over
[1024, 151,936]. Both frameworks do the same arithmetic, so the train-speed ratio cannot beat
the ratio of these kernels. One JSON line per kernel: GFLOP/s (GEMMs) or seconds (softmax) for
each side and jax/torch, threads = CPU cores for both.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

M, K, N = 1024, 512, 151_936  # TRAIN_BATCH * TRAIN_LEN tokens, hidden, vocab


def _best(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    h, w, g = (rng.standard_normal(s, np.float32) for s in ((M, K), (K, N), (M, N)))
    hj, wj, gj = (jnp.asarray(a) for a in (h, w, g))
    ht, wt, gt = (torch.from_numpy(a.copy()) for a in (h, w.T, g))  # torch keeps W as [V, D]
    flops = 2 * M * K * N
    fwd, dh, dw = (jax.jit(f) for f in (lambda a, b: a @ b, lambda a, b: a @ b.T, jnp.dot))
    gemms = {
        "head forward h @ W": (lambda: fwd(hj, wj).block_until_ready(), lambda: ht @ wt.T),
        "head backward dh = g @ W^T": (lambda: dh(gj, wj).block_until_ready(), lambda: gt @ wt),
        "head backward dW = h^T @ g": (
            lambda: dw(hj.T, gj).block_until_ready(),
            lambda: gt.T @ ht,
        ),
    }
    for name, (xla, pt) in gemms.items():
        a, b = flops / _best(xla) / 1e9, flops / _best(pt) / 1e9
        row = {"kernel": name, "xla_gflops": a, "torch_gflops": b, "xla_over_torch": a / b}
        print(json.dumps(row), flush=True)
    lse = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1))
    a = _best(lambda: lse(gj).block_until_ready())
    b = _best(lambda: torch.logsumexp(gt, dim=-1))
    row = {"kernel": "logsumexp [1024, 151936]", "xla_s": a, "torch_s": b, "xla_over_torch": b / a}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
