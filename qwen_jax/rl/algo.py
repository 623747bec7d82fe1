"""PPO (the report's RLHF stage, spec §5.3) and GRPO: the four models, one iteration, and every
program of an iteration for AOT compilation.

`build_rl(config, tokenizer, mesh) -> RL`. Models, all on `mesh` with the trainer's sharding
rules (qwen_jax.sharding's table through train/step.py's abstract states):
  policy     from config.init_from (the SFT export), trained: the trainer's state format
             {"params", "opt_state", "step"}, optimizer config.optim (policy LR = optim.peak_lr)
  reference  a frozen copy of the initial policy in rl.reference_dtype (bf16 / fp32 / int8 via
             model/quantize.py with the head kept float)
  reward     PPO: rl.reward_model (reward head), frozen, in rl.reference_dtype
  value      PPO: reward head model, from the RM (value_init="reward") or from the policy with a
             zero head ("policy"); its own AdamW = config.optim with peak_lr = rl.value_lr
RLState = {"policy": TrainState, "value": TrainState | None, "reward_stats": RunningMoments,
"iteration": int32, "rng": uint32[2] key}. The reference and reward weights are NOT in the
state: they are fixed sources (rl/loop.py re-reads them on resume).

One iteration (`RL.iteration`), shapes N = prompts_per_step x samples_per_prompt rows, T the
rollout bucket (one shape for the run, so every program compiles once):
  1. rollout   the RolloutEngine's weights refreshed in place from the policy params; N samples
               drawn with seed fold_in(rng, iteration).
  2. score     ONE jitted program ("experience"): old policy log-probs (+ entropy), reference
               log-probs, per-token KL (rl.kl_estimator). PPO: RM scores; the running moments
               are updated with this batch FIRST and the scores normalised with the updated
               moments (TRL / OpenRLHF order: the batch's own spread counts); per-token rewards
               -kl_coef*KL + normalised score at the last response token; values; GAE(gamma,
               lam); advantages whitened over the batch's response tokens. GRPO: the host's rule
               rewards (rl/rewards.py) -> group-relative advantages, broadcast over the
               response tokens; the KL (k3 in the GRPO recipe) is a loss term instead.
  3. update    ppo_epochs x minibatches (a fixed row permutation per epoch from the iteration's
               key) of jitted steps: the value step (PPO: 0.5 max((v-R)^2, (clip(v)-R)^2), clip
               value_clip around the old values, mean over response tokens) and the policy step
               (clipped surrogate, token-level mean over the minibatch's response tokens;
               + kl_coef * mean KL for GRPO / kl_in_reward=False; + ptx_coef * the LM loss of the
               pretraining batch for PPO-ptx, the same batch for every minibatch of the
               iteration). While iteration < value_warmup_steps the policy step does not run
               (its params and optimizer state are untouched).
Dropout is off in every RL forward (TRL and OpenRLHF disable it: the ratio must compare the
same function). A NaN/inf in a score, advantage, loss or gradient norm raises RLNumericsError
before the new state is returned (the caller's state is the last good one).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen
from qwen_jax.rl import losses
from qwen_jax.rl.config import RLConfig, check
from qwen_jax.rl.normalizer import RunningMoments
from qwen_jax.rl.rollout import RolloutEngine
from qwen_jax.rl.scoring import sequence_logprobs, sequence_scores, token_values
from qwen_jax.sharding import logical_spec, tree_shardings
from qwen_jax.train.objectives import LMObjective, StepContext
from qwen_jax.train.optim import make_optimizer
from qwen_jax.train.step import abstract_train_state, base_config, new_state

RLState = dict[str, Any]
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class RLNumericsError(ValueError):
    """A NaN or inf in a score, advantage or loss: "iteration N: <quantity> is nan"."""


def _sharded(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


@dataclasses.dataclass
class _Frozen:
    """A frozen model: graphdef + its (sharded) state; `abstract` for AOT."""

    graphdef: Any
    abstract: Any  # sharded ShapeDtypeStructs of the state
    state: Any = None

    def model(self, state) -> Qwen:
        return nnx.merge(self.graphdef, state)


def _frozen_of(cfg: QwenConfig, dtype: str, mesh: Mesh) -> _Frozen:
    """The abstract frozen model of `cfg` held in `dtype` (int8: dense block weights quantized,
    the head kept float as the LoRA int8 base does)."""

    def make():
        model = Qwen(cfg, rngs=nnx.Rngs(0))
        if dtype == "int8":
            from qwen_jax.model.quantize import quantize_int8

            return quantize_int8(model, head=False)
        return model

    abstract_model = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract_model)
    shardings = tree_shardings(state, mesh)
    cast = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, _cast_dtype(v.dtype, dtype)), state)
    abstract = _sharded(cast, shardings)
    return _Frozen(graphdef, abstract)


def _cast_dtype(d, dtype: str):
    if dtype in _DTYPES and jnp.issubdtype(d, jnp.floating):
        return _DTYPES[dtype]
    return d


def _freeze(model: Qwen, frozen: _Frozen, dtype: str, mesh: Mesh):
    """A loaded float model -> the frozen state (cast / quantized, placed as `frozen.abstract`)."""
    if dtype == "int8":
        from qwen_jax.model.quantize import quantize_int8

        model = quantize_int8(model, head=False)
    _, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(_cast_dtype(x.dtype, dtype)), state)
    return jax.device_put(state, jax.tree.map(lambda a: a.sharding, frozen.abstract))


class RL:
    """The models, programs and iteration of one PPO / GRPO run (module docstring)."""

    def __init__(self, config, tokenizer, mesh: Mesh, model_cfg: QwenConfig, load: bool = True):
        self.config, self.rl, self.mesh = config, config.rl, mesh
        self.tokenizer = tokenizer
        rl: RLConfig = config.rl
        self.ppo = rl.algorithm == "ppo"
        self.n = rl.prompts_per_step * rl.samples_per_prompt
        self.mb = self.n // rl.minibatches
        self.policy_cfg = model_cfg
        seed = config.run.seed
        self.tx = make_optimizer(config.optim)
        self.graphdef, abstract = abstract_train_state(model_cfg, self.tx, seed=seed)
        self.policy_sh = tree_shardings(abstract, mesh)
        self.policy_abstract = _sharded(abstract, self.policy_sh)
        self.reference = _frozen_of(base_config(model_cfg), rl.reference_dtype, mesh)
        self.value_cfg = self.reward = self.value_graphdef = None
        self.value_sh = self.value_abstract = self.value_tx = None
        if self.ppo:
            self.reward_source = _reward_source(rl.reward_model, model_cfg, load)
            self.reward = _frozen_of(self.reward_source.model_cfg, rl.reference_dtype, mesh)
            self.value_cfg = model_cfg.replace(reward_head=True)
            if rl.value_init == "reward":
                self.value_cfg = self.reward_source.model_cfg.replace(
                    dtype=model_cfg.dtype,
                    param_dtype=model_cfg.param_dtype,
                    remat_policy=model_cfg.remat_policy,
                )
            self.value_tx = make_optimizer(dataclasses.replace(config.optim, peak_lr=rl.value_lr))
            self.value_graphdef, vabs = abstract_train_state(self.value_cfg, self.value_tx, seed)
            self.value_sh = tree_shardings(vabs, mesh)
            self.value_abstract = _sharded(vabs, self.value_sh)
        rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.replicated = rep
        self._rows_sh = self._row_sharding(self.n)
        self._mb_sh = self._row_sharding(self.mb)
        from qwen_jax.infer.engine import bucket_length

        self.seq_len = bucket_length(rl.max_prompt_len + rl.max_new_tokens)  # T
        self._build_programs()
        self.rollout = None
        if not load:  # abstract only (AOT): no weights read, no engine
            return
        self._load_models()
        from qwen_jax.infer.sampling import SamplingParams
        from qwen_jax.tokenizer import chatml

        self.rollout = RolloutEngine(
            self._policy_model(self._init_policy_params),
            mesh=mesh,
            max_prompt_len=rl.max_prompt_len,
            max_new_tokens=rl.max_new_tokens,
            stop_ids=chatml.stop_ids(tokenizer),
            sampling=SamplingParams(temperature=rl.temperature, top_p=rl.top_p),
            pad_id=tokenizer.pad_id,
        )

    # ---- shardings, models -------------------------------------------------------------

    def _row_sharding(self, rows: int) -> tuple[NamedSharding, NamedSharding]:
        """(per-row [B], per-token [B, T]) shardings: rows over the batch axes when they divide."""
        spec_b = logical_spec("batch", shape=(rows,), mesh=self.mesh)
        spec_bt = logical_spec("batch", None, shape=(rows, 1), mesh=self.mesh)
        return NamedSharding(self.mesh, spec_b), NamedSharding(self.mesh, spec_bt)

    def _policy_model(self, params) -> Qwen:
        return nnx.merge(self.graphdef, params)

    def _load_models(self) -> None:
        """The policy's starting weights, the frozen reference and reward states, the value
        model's starting params (read once; init_state builds optimizer states around them)."""
        from qwen_jax.train import init_from
        from qwen_jax.train.step import split_model

        cfg = self.policy_cfg
        source = init_from.find_source(self.config.init_from)
        init_from.check_source(source, cfg)
        policy = _load_model(source, base_config(cfg), self.mesh)
        _, params, _ = split_model(policy)
        self._init_policy_params = jax.device_put(params, self.policy_sh["params"])
        self.reference.state = _freeze(policy, self.reference, self.rl.reference_dtype, self.mesh)
        self._init_value_params = None
        if not self.ppo:
            return
        rm = _load_model(self.reward_source, self.reward_source.model_cfg, self.mesh)
        self.reward.state = _freeze(rm, self.reward, self.rl.reference_dtype, self.mesh)
        if self.rl.value_init == "reward":
            value = nnx.merge(*nnx.split(rm))
        else:
            value = Qwen(self.value_cfg, rngs=nnx.Rngs(self.config.run.seed))
            nnx.update(value, nnx.state(policy, nnx.Param))
            value.score[...] = jnp.zeros_like(value.score[...])
        vparams = nnx.state(value, nnx.Param)
        vparams = jax.tree.map(lambda x: x.astype(jnp.dtype(self.value_cfg.param_dtype)), vparams)
        self._init_value_params = jax.device_put(vparams, self.value_sh["params"])

    # ---- state -------------------------------------------------------------------------

    def init_state(self) -> RLState:
        """The run's first state: fresh optimizer states around the starting weights."""
        if self._init_policy_params is None:
            raise RuntimeError("init_state: the starting weights were released (call it first)")
        policy = jax.jit(
            lambda p: new_state(p, self.tx), out_shardings=self.policy_sh, donate_argnums=()
        )(self._init_policy_params)
        value = None
        if self.ppo:
            value = jax.jit(lambda p: new_state(p, self.value_tx), out_shardings=self.value_sh)(
                self._init_value_params
            )
        rep = self.replicated
        return {
            "policy": policy,
            "value": value,
            "reward_stats": jax.device_put(RunningMoments.create(), rep),
            "iteration": jax.device_put(jnp.zeros((), jnp.int32), rep),
            "rng": jax.device_put(jax.random.PRNGKey(self.config.run.seed), rep),
        }

    def abstract_state(self) -> RLState:
        """RLState of ShapeDtypeStructs with shardings (checkpoint restore target, AOT input)."""
        rep = self.replicated

        def scalar(dtype, shape=()):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

        stats = RunningMoments(*(scalar(jnp.float32) for _ in range(3)))
        return {
            "policy": self.policy_abstract,
            "value": self.value_abstract,
            "reward_stats": stats,
            "iteration": scalar(jnp.int32),
            "rng": scalar(jnp.uint32, (2,)),
        }

    # ---- programs ----------------------------------------------------------------------

    def _build_programs(self) -> None:
        rl = self.rl
        graphdef, ref, ppo = self.graphdef, self.reference, self.ppo
        rm, vgd = self.reward, self.value_graphdef
        lm = LMObjective()

        def experience(policy_params, ref_state, value_params, rm_state, stats, batch):
            tokens, lengths, mask = batch["tokens"], batch["lengths"], batch["mask"]
            policy = nnx.merge(graphdef, policy_params)
            logp, entropy = sequence_logprobs(policy, tokens, lengths, with_entropy=True)
            ref_logp = sequence_logprobs(ref.model(ref_state), tokens, lengths)
            kl = losses.kl_estimate(logp, ref_logp, rl.kl_estimator) * mask
            k1 = losses.kl_estimate(logp, ref_logp, "k1") * mask
            out = {"old_logp": logp, "ref_logp": ref_logp}
            if ppo:
                raw = sequence_scores(rm.model(rm_state), tokens, lengths)
                if rl.normalize_reward:
                    stats = stats.update(raw)
                    score = stats.normalize(raw)
                else:
                    score = raw
                kl_coef = rl.kl_coef if rl.kl_in_reward else 0.0
                rewards = losses.ppo_token_rewards(score, kl, mask, kl_coef)
                values = token_values(nnx.merge(vgd, value_params), tokens, lengths) * mask
                adv, returns = losses.gae(rewards, values, mask, rl.gamma, rl.lam)
                adv = losses.whiten(adv, mask) * mask
                out.update(old_values=values, returns=returns)
                metrics = {"explained_var": losses.explained_variance(values, returns, mask)}
            else:
                raw = batch["rule_rewards"]
                stats = stats.update(raw)
                score = raw
                adv_pg = losses.group_advantages(raw.reshape(rl.prompts_per_step, -1))
                adv = adv_pg.reshape(-1)[:, None] * mask
                metrics = {}
            out["advantages"] = adv
            tokens_n = jnp.maximum(mask.sum(), 1.0)
            metrics.update(
                reward_raw=raw.mean(),
                reward_norm=score.mean(),
                kl=k1.sum(-1).mean(),  # k1 summed over a response, mean over responses
                kl_estimate=kl.sum(-1).mean(),
                entropy=(entropy * mask).sum() / tokens_n,
                advantages_max_abs=jnp.abs(adv).max(),
            )
            return out, stats, metrics

        def policy_loss(params, mb, ptx):
            tokens, lengths, mask = mb["tokens"], mb["lengths"], mb["mask"]
            model = nnx.merge(graphdef, params)
            logp = sequence_logprobs(model, tokens, lengths)
            sums = losses.policy_loss_sums(
                logp, mb["old_logp"], mb["advantages"], mask, rl.clip_eps
            )
            n = jnp.maximum(mask.sum(), 1.0)
            metrics = {k: v / n for k, v in sums.items()}
            loss = metrics["policy_loss"]
            if not ppo or not rl.kl_in_reward:
                kl = losses.kl_estimate(logp, mb["ref_logp"], rl.kl_estimator) * mask
                metrics["kl_loss"] = kl.sum() / n
                loss = loss + rl.kl_coef * metrics["kl_loss"]
            if ptx is not None:
                obj, sums = lm.loss_sums(model, ptx, StepContext())
                metrics["ptx_loss"] = obj / jnp.maximum(sums["tokens"], 1.0)
                loss = loss + rl.ptx_coef * metrics["ptx_loss"]
            metrics["loss"] = loss
            return loss, metrics

        def policy_step(state, mb, ptx):
            grads, metrics = jax.grad(policy_loss, has_aux=True)(state["params"], mb, ptx)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics["grad_norm"] = optax.tree.norm(grads)
            new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
            return new, metrics

        def value_loss(params, mb):
            mask = mb["mask"]
            values = token_values(nnx.merge(vgd, params), mb["tokens"], mb["lengths"])
            s = losses.value_loss_sum(values, mb["old_values"], mb["returns"], mask, rl.value_clip)
            loss = s / jnp.maximum(mask.sum(), 1.0)
            return loss, {"value_loss": loss}

        def value_step(state, mb):
            grads, metrics = jax.grad(value_loss, has_aux=True)(state["params"], mb)
            updates, opt_state = self.value_tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics["value_grad_norm"] = optax.tree.norm(grads)
            new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
            return new, metrics

        rep = self.replicated
        self._experience = jax.jit(experience, out_shardings=(None, rep, None))
        # No donation: the caller's state must survive a step whose loss turns out NaN.
        self._policy_step = jax.jit(policy_step, out_shardings=(self.policy_sh, None))
        self._value_step = jax.jit(value_step, out_shardings=(self.value_sh, None)) if ppo else None

    def programs(self) -> dict[str, Any]:
        """name -> the jitted function of every program of an iteration (compile counting)."""
        out = {"experience": self._experience, "policy_step": self._policy_step}
        if self._value_step is not None:
            out["value_step"] = self._value_step
        return out

    # ---- batches -----------------------------------------------------------------------

    def _abstract_batch(self, rows: int, minibatch: bool) -> dict[str, jax.ShapeDtypeStruct]:
        t = self.seq_len
        sh_b, sh_bt = self._mb_sh if minibatch else self._rows_sh
        out = {
            "tokens": jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=sh_bt),
            "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh_b),
            "mask": jax.ShapeDtypeStruct((rows, t), jnp.float32, sharding=sh_bt),
        }
        if not minibatch and not self.ppo:
            out["rule_rewards"] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sh_b)
        if minibatch:
            names = ["old_logp", "ref_logp", "advantages"]
            names += ["old_values", "returns"] if self.ppo else []
            for name in names:
                out[name] = jax.ShapeDtypeStruct((rows, t), jnp.float32, sharding=sh_bt)
        return out

    def _abstract_ptx(self):
        if self.rl.ptx_coef <= 0:
            return None
        rows, t = self.config.data.global_batch, self.config.data.seq_len
        sh = NamedSharding(self.mesh, logical_spec("batch", None, shape=(rows, t), mesh=self.mesh))
        return {
            k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
            for k, a in LMObjective().abstract_batch(rows, t).items()
        }

    def _put(self, host: dict, abstract: dict) -> dict:
        return {k: jax.device_put(np.asarray(v), abstract[k].sharding) for k, v in host.items()}

    # ---- the iteration -----------------------------------------------------------------

    def iteration(
        self,
        state: RLState,
        prompts: list[list[int]],
        records: list[dict],
        ptx_batch: dict | None = None,
    ) -> tuple[RLState, dict[str, float]]:
        """One RL iteration (module docstring). Returns (the new state, metrics as floats);
        raises RLNumericsError (the input state stays the caller's last good one)."""
        rl = self.rl
        if len(prompts) != rl.prompts_per_step:
            raise ValueError(
                f"{len(prompts)} prompts given, rl.prompts_per_step={rl.prompts_per_step}"
            )
        if rl.ptx_coef > 0 and ptx_batch is None:
            raise ValueError("rl.ptx_coef > 0: iteration needs a pretraining batch (ptx_batch)")
        # The starting weights are only init_state's: a run past it (or resumed) frees them.
        self._init_policy_params = self._init_value_params = None
        it = int(state["iteration"])
        key = jax.random.fold_in(state["rng"], it)
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        timings = {}

        t0 = time.perf_counter()
        self.rollout.refresh(state["policy"]["params"])
        ro = self.rollout.generate(prompts, rl.samples_per_prompt, seed)
        mask = ro.response_mask()
        host = {"tokens": ro.tokens, "lengths": ro.lengths, "mask": mask}
        if not self.ppo:
            from qwen_jax.rl.rewards import rule_rewards
            from qwen_jax.tokenizer.base import decode_marking_unknown

            # A policy whose embedding has more rows than the tokenizer has ids (Qwen2's padded
            # 151,936) can sample an id with no text: it becomes a `<unk:ID>` marker, as in
            # serving, and the reply is scored as written.
            texts = [decode_marking_unknown(self.tokenizer, r)[0] for r in ro.responses()]
            rows = [records[g] for g in ro.group]
            host["rule_rewards"] = np.asarray(rule_rewards(rl.reward_fn, texts, rows), np.float32)
        timings["time_rollout_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = self._put(host, self._abstract_batch(self.n, False))
        value_params = state["value"]["params"] if self.ppo else None
        rm_state = self.reward.state if self.ppo else None
        exp, stats, exp_metrics = self._experience(
            state["policy"]["params"],
            self.reference.state,
            value_params,
            rm_state,
            state["reward_stats"],
            batch,
        )
        exp_metrics = {k: float(v) for k, v in jax.device_get(exp_metrics).items()}
        for name in ("reward_raw", "reward_norm", "advantages_max_abs", "kl"):
            _finite(it, name, exp_metrics[name])
        timings["time_score_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        experience = {**{k: np.asarray(v) for k, v in jax.device_get(exp).items()}, **host}
        experience.pop("rule_rewards", None)
        mb_abstract = self._abstract_batch(self.mb, True)
        ptx = None
        if rl.ptx_coef > 0:
            ptx = self._put({k: ptx_batch[k] for k in LMObjective().feature_names},
                            self._abstract_ptx())  # fmt: skip
        policy, value = state["policy"], state["value"]
        train_policy = it >= rl.value_warmup_steps or not self.ppo
        order_rng = np.random.default_rng([int(x) for x in np.asarray(key).reshape(-1)])
        step_metrics: list[dict] = []
        for _ in range(rl.ppo_epochs):
            order = order_rng.permutation(self.n)
            for m in range(rl.minibatches):
                rows = order[m * self.mb : (m + 1) * self.mb]
                mb = self._put({k: v[rows] for k, v in experience.items()}, mb_abstract)
                row: dict = {}
                if self.ppo:
                    value, vm = self._value_step(value, mb)
                    row.update(vm)
                if train_policy:
                    policy, pm = self._policy_step(policy, mb, ptx)
                    row.update(pm)
                step_metrics.append(row)
        step_metrics = jax.device_get(step_metrics)
        timings["time_update_s"] = time.perf_counter() - t0

        metrics = {
            name: 0.0 for name in ("clipfrac", "approx_kl", "policy_loss", "value_loss", "ptx_loss")
        }
        metrics["explained_var"] = 0.0
        metrics.update(exp_metrics)
        for name in step_metrics[0]:
            metrics[name] = float(np.mean([float(r[name]) for r in step_metrics]))
        for name in ("policy_loss", "value_loss", "ptx_loss", "loss", "grad_norm"):
            if name in metrics:
                _finite(it, name, metrics[name])
        metrics["response_len"] = float(np.mean(ro.lengths - ro.prompt_lengths))
        metrics["finished_frac"] = float(np.mean(ro.finished))
        metrics["policy_updated"] = float(train_policy)
        metrics.update(timings)
        new = {
            "policy": policy,
            "value": value,
            "reward_stats": stats,
            "iteration": state["iteration"] + 1,
            "rng": state["rng"],
        }
        return new, metrics

    # ---- AOT ---------------------------------------------------------------------------

    def aot_programs(self) -> dict[str, jax.stages.Lowered]:
        """Every jitted program of an iteration lowered from abstract inputs (no real arrays):
        the scoring forward ("experience"), the policy and value update steps and the rollout
        engine's prefill / decode at the rollout shapes (rl/rollout.py's `lowered` when it has
        one)."""
        s = self.abstract_state()
        batch = self._abstract_batch(self.n, False)
        mb = self._abstract_batch(self.mb, True)
        ref = self.reference.abstract
        value = s["value"]["params"] if self.ppo else None
        rm = self.reward.abstract if self.ppo else None
        with jax.set_mesh(self.mesh):
            out = {
                "experience": self._experience.lower(
                    s["policy"]["params"], ref, value, rm, s["reward_stats"], batch
                ),
                "policy_step": self._policy_step.lower(s["policy"], mb, self._abstract_ptx()),
            }
            if self.ppo:
                out["value_step"] = self._value_step.lower(s["value"], mb)
            lowered = getattr(self.rollout, "lowered", None) if self.rollout else None
            if lowered is not None:
                out.update(
                    {f"rollout_{k}": v for k, v in lowered(self.rl.prompts_per_step).items()}
                )
        return out


def _finite(it: int, name: str, value: float) -> None:
    """RLNumericsError naming the iteration 1-based (`it` is the state's 0-based counter), as
    metrics.jsonl and the checkpoints number them."""
    if not np.isfinite(value):
        raise RLNumericsError(f"iteration {it + 1}: {name} is {value}")


def _load_model(source, cfg: QwenConfig, mesh: Mesh) -> Qwen:
    """A source's full model (reward head included when cfg has one), sharded on mesh."""
    if source.kind == "train":
        from qwen_jax.train.export import restore_model

        _, model, _ = restore_model(source.path.parent, mesh=mesh)
        return model
    from qwen_jax.checkpoint import load_hf, load_params

    load = load_params if source.kind == "params" else load_hf
    _, model = load(source.path, mesh=mesh, cfg=cfg)
    return model


def _reward_source(spec: str, policy_cfg: QwenConfig, load: bool):
    """The RM's init_from Source; without `load` and without the files (AOT on a host that
    does not hold them) an RM of the policy's architecture with a reward head."""
    from qwen_jax.train import init_from

    try:
        return init_from.find_source(spec)
    except init_from.InitFromError:
        if load:
            raise
        return init_from.Source("params", Path(spec), policy_cfg.replace(reward_head=True))


def build_rl(config, tokenizer, mesh: Mesh, *, load: bool = True) -> RL:
    """The RL run of `config` (config.rl.algorithm "ppo" / "grpo") on `mesh`; the config is
    checked (rl/config.py `check`) before anything is loaded or compiled. load=False: abstract
    models only (`abstract_state`, `aot_programs`; no `init_state`, `iteration` or rollout
    engine), the sources need not exist."""
    from qwen_jax.train.loop import model_vocab_size

    vocab = model_vocab_size(config, tokenizer.vocab_size)
    rl = config.rl
    sources_here = load or (rl.algorithm == "ppo" and Path(rl.reward_model).is_dir())
    check(rl, config if sources_here else None, vocab)
    return RL(config, tokenizer, mesh, config.model_config(vocab), load=load)
