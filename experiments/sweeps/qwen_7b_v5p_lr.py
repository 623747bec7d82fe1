"""Qwen-7B peak learning-rate sweep on TPU v5p-128 slices (one slice per point).

Reproduces: the report's 7B recipe (experiments/pretrain/qwen_7b.py: AdamW, warmup + cosine to
10%, 4M-token batches, bf16, full remat) shortened to a 5,000-step (21B-token) ablation, at three
peak learning rates around the report's 3e-4.
Hardware: each point is the full 7B on its own TPU v5p-128 slice (64 chips, 16 hosts; mesh
fsdp=64), multi-host through jax.distributed; 3 slices if the points run side by side.
Expected: 5,000 steps x 1.85e17 FLOPs at 40% MFU on 64 chips: ~22 h and ~1,400 chip-hours per
point (`plan` prints the figures; `plan --fast`: 45 GiB of 95 per device with 2 of 32 layers).
Metric: held-out loss at the end (eval_loss, min).

Environment on the slices: qwen-jax is not on PyPI. For tpu-vm, build a wheel and put it in the
bucket (`pip wheel --no-deps -w dist . && gcloud storage cp dist/qwen_jax-*.whl
gs://qwen-jax-sweeps/wheels/`); `setup` below installs it on every host. The runtime image must
have Python >= 3.11 (setup.cfg); an image with an older Python needs a newer interpreter first
(e.g. `uv python install 3.11` in `setup`) -- not checked on a real slice yet. For xpk, the
docker image holds qwen-jax and experiments/ in its working directory.

Commands (plan and dry-run work on any host; launching needs gcloud or xpk and the bucket):
  qwen-jax sweep plan experiments/sweeps/qwen_7b_v5p_lr.py --fast        # HBM/FLOPs per point
  qwen-jax sweep launch experiments/sweeps/qwen_7b_v5p_lr.py --backend=tpu-vm --dry-run
  qwen-jax sweep launch experiments/sweeps/qwen_7b_v5p_lr.py --backend=xpk --dry-run
  qwen-jax sweep status experiments/sweeps/qwen_7b_v5p_lr.py
  qwen-jax sweep collect experiments/sweeps/qwen_7b_v5p_lr.py --out=runs/qwen_7b_lr
"""

from qwen_jax.sweep.spec import Grid, Launch, Sweep

BUCKET = "gs://qwen-jax-sweeps"


def get_sweep() -> Sweep:
    return Sweep(
        name="qwen_7b_v5p_lr",
        experiment="experiments/pretrain/qwen_7b.py",
        space=Grid({"optim.peak_lr": [1.5e-4, 3e-4, 6e-4]}),
        fixed={
            "data.data_dir": f"{BUCKET}/corpora",
            "optim.warmup_steps": 500,
            "optim.total_steps": 5000,
            "run.steps": 5000,
            "run.eval_every": 1000,
            "run.checkpoint_every": 500,
            "tpu.topology": "v5p-128",
        },
        metric="eval_loss",
        mode="min",
        read="final",
        launch=Launch(
            topology="v5p-128",
            zone="us-east5-a",
            runtime_version="v2-alpha-tpuv5",
            project=None,  # gcloud's configured project
            gcs_root=f"{BUCKET}/sweeps",
            cluster="qwen-v5p-128",
            docker_image="us-docker.pkg.dev/qwen-jax/images/qwen-jax:latest",
            setup=(
                f"gcloud storage cp {BUCKET}/wheels/qwen_jax-0.1.0-py3-none-any.whl /tmp/ && "
                "pip install --quiet '/tmp/qwen_jax-0.1.0-py3-none-any.whl[tpu]'"
            ),
        ),
    )
