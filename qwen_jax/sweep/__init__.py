"""Sweeps over experiment files (issue 18): plan, launch through existing launchers, collect.

- spec.py     THE sweep file format: Sweep (base experiment, Grid / Random / Bayes space, named
              points, seeds, metric + mode + read), Point, Launch; expansion and validation
- plan.py     `qwen-jax sweep plan`: per point HBM fit (AOT compile for its TPU slice),
              analytical FLOPs, tokens and chip-hours at a stated MFU; rejects what does not fit
- launch.py   `qwen-jax sweep launch`: local subprocesses, Cloud TPU VMs (gcloud queued
              resources + ssh --worker=all) or GKE (xpk); idempotent by point status
- collect.py  point status from its workdir (local or gs://), the results table (CSV, markdown)
              and PNG plots
- cli.py      `qwen-jax sweep {plan,launch,status,collect} SWEEP_FILE ...`
"""
