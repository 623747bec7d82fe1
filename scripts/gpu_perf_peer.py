"""The peer phase of scripts/gpu_perf.py: torch + transformers Qwen2ForCausalLM on the same
GPU, the same shapes as our train rows and our serve rows. Runs in its own process (no JAX
backend started there), so torch has the whole GPU.

Train: fp32 weights, bf16 autocast, attention "sdpa", next-token CE over fp32 logits, clip
1.0, fused AdamW (0.9, 0.95, 1e-8, wd 0.1); one document per row (SDPA has no packing), no
activation checkpointing unless the step runs out of memory without it (then recorded).
Serve: bf16 weights, `generate` greedy with exactly `new` tokens (min = max), decode rate
t(new) - t(1) over new - 1 steps, as the serve phase times ours.
"""

from __future__ import annotations

import statistics
import time

from gpu_perf_train import _model_config, _short, selected_rows


def _qwen2(cfg, device, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peer_train_row(cfg, batch: int, seq: int, device: str, steps: int) -> dict:
    import torch

    model = _qwen2(cfg, device, torch.float32).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
        fused=device == "cuda",
    )  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    checkpointing = False
    try:
        step()
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        model.gradient_checkpointing_enable()
        checkpointing = True
        step()
    step()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    if device == "cuda":  # the model and optimizer are freed when this returns
        torch.cuda.reset_peak_memory_stats()
    return dict(
        step_ms=round(sec * 1e3, 2),
        tokens_per_s=round(batch * seq / sec, 1),
        loss=round(float(loss), 4),
        gradient_checkpointing=checkpointing,
        peak_bytes_allocated=peak,
    )


def peer_generate_row(model, cfg, batch: int, prompt: int, new: int, device: str) -> dict:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(0, min(cfg.vocab_size, 151_643), (batch, prompt), generator=gen)
    ids = ids.to(device)

    def timed(n):
        best = float("inf")
        for _ in range(3):  # the first run warms up
            _sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                    min_new_tokens=n, do_sample=False, pad_token_id=0,
                )  # fmt: skip
            _sync(device)
            best = min(best, time.perf_counter() - t)
            if out.shape[1] != prompt + n:
                raise AssertionError(f"generate made {out.shape[1] - prompt} tokens, not {n}")
        return best

    t_new, t_one = timed(new), timed(1)
    step = (t_new - t_one) / (new - 1)
    return dict(
        decode_step_ms=round(step * 1e3, 3),
        decode_tokens_per_s=round(batch / step, 1),
        generate_s=round(t_new, 3),
    )


def peer_phase(budget, smoke: bool, emit, levers=None, max_rows=None) -> dict:
    """Peer rows at the shapes of the train rows `levers` / `max_rows` select."""
    import torch
    from gpu_perf_serve import serve_shape

    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    env = {"torch_device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    rows, shapes = [], []
    for row in selected_rows(smoke, levers, max_rows):
        if (row.model, row.layers, row.seq, row.batch) not in [s[:4] for s in shapes]:
            shapes.append((row.model, row.layers, row.seq, row.batch, row))
    serve = serve_shape(smoke)
    cfg, prompt, new = serve["cfg"], serve["prompt"], serve["new"]
    model = None

    def generate(batch):
        nonlocal model
        if model is None:
            model = _qwen2(cfg, device, torch.bfloat16).eval()
        return peer_generate_row(model, cfg, batch, prompt, new, device)

    def train(row):
        nonlocal model
        model = None  # free the generate model first
        cfg = _model_config(row, smoke)
        return peer_train_row(cfg, row.batch, row.seq, device, 2 if smoke else 5)

    # Priority: the first train shape, our serve shape, then the other train shapes.
    jobs = [("train", s) for s in shapes[:1]] + [("serve", b) for b in serve["batches"]]
    jobs += [("train", s) for s in shapes[1:]]
    for kind, what in jobs:
        if kind == "train":
            model_name, layers, seq, batch, row = what
            rec = dict(kind="train", impl="transformers", model=model_name, layers=layers)
            rec.update(seq=seq, batch=batch, packed=False, attention="sdpa")
            rows.append(_run(budget, rec, lambda row=row: train(row)))
        else:
            rec = dict(kind="serve", impl="transformers", weights="bfloat16", batch=what)
            rec.update(prompt=prompt, new=new)
            rows.append(_run(budget, rec, lambda b=what: generate(b)))
        emit(rows, env)
    return {"rows": rows, **env}


def _run(budget, rec: dict, fn) -> dict:
    if not budget.fits():
        return {**rec, "status": "skipped: budget"}
    t0 = time.perf_counter()
    try:
        rec.update(fn(), status="ok")
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on
        import traceback

        traceback.print_exc()
        rec.update(status="error", error=_short(e))
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    budget.took(rec["wall_s"])
    return rec
