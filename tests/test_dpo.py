"""DPO: the loss, implicit rewards and gradients equal TRL's on the same log-probabilities;
response log-probs equal a numpy log-softmax of the model's logits; a reference equal to the
policy gives log 2 per pair; precomputed reference log-probs give what the frozen copy gives;
a tiny DPO run raises held-out reward accuracy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen_jax.model import config as C
from qwen_jax.model.transformer import Qwen
from qwen_jax.testing.pairs import rule_pairs
from qwen_jax.train.dpo import (
    DPOObjective,
    dpo_loss,
    pair_logps,
    precompute_reference_logps,
    sequence_logps,
)
from qwen_jax.train.objectives import ObjectiveConfig, StepContext, make_objective

VOCAB, T = 64, 16
STEPS = 40


def _model(seed: int = 0) -> Qwen:
    return Qwen(C.tiny(vocab_size=VOCAB, num_kv_heads=2, init_std=0.1), rngs=nnx.Rngs(seed))


def _batch(n: int, seed: int, padding_rows: int = 0):
    return {k: jnp.asarray(v) for k, v in rule_pairs(n, T, VOCAB, seed, padding_rows).items()}


# ------------------------------------------------------------------------------ sequence logps


def test_sequence_logps_match_numpy_log_softmax():
    model = _model()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (4, T)).astype(np.int32)
    lengths = np.array([T, 9, 5, 0], np.int32)  # full, two padded rows, an empty row
    prompts = np.array([3, 1, 4, 0], np.int32)
    logps = nnx.jit(sequence_logps, static_argnames="chunk")
    got = logps(model, jnp.asarray(tokens), lengths, prompts, chunk=4)

    logits, _ = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    want = [
        sum(logp[b, t - 1, tokens[b, t]] for t in range(prompts[b], lengths[b])) for b in range(4)
    ]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=0)
    assert got[3] == 0.0
    # Padding after a row's length is never read.
    tokens[1, 9:] = 0
    again = logps(model, jnp.asarray(tokens), lengths, prompts, chunk=4)
    assert float(again[1]) == float(got[1])


# ------------------------------------------------------------------------------ objective


def _sums(objective):
    """objective.loss_sums jitted: (policy, reference or None, batch, rng or None) -> sums."""
    return nnx.jit(lambda p, r, b, k: objective.loss_sums(p, b, StepContext(rng=k, reference=r)))


def test_objective_config_features_and_reference_switch():
    obj = make_objective(ObjectiveConfig(name="dpo", beta=0.5, loss_chunk=8))
    assert obj == DPOObjective(beta=0.5, chunk=8) and obj.needs_reference
    pre = make_objective(
        ObjectiveConfig(name="dpo", dpo_loss="ipo", reference="precomputed", loss_chunk=8)
    )
    assert pre == DPOObjective(loss_type="ipo", reference="precomputed", chunk=8)
    assert not pre.needs_reference
    assert pre.feature_names == (*obj.feature_names, "ref_chosen_logps", "ref_rejected_logps")
    abstract = pre.abstract_batch(4, 32)
    assert abstract["chosen_tokens"].shape == (4, 32) and abstract["prompt_lengths"].shape == (4,)
    assert abstract["ref_chosen_logps"].dtype == jnp.float32
    assert abstract["ref_rejected_logps"].shape == (4,)
    for bad, match in [
        (dict(loss_type="hinge"), "dpo_loss"),
        (dict(reference="none"), "reference"),
        (dict(beta=0.0), "beta"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(label_smoothing=0.5), "label_smoothing"),
    ]:
        with pytest.raises(ValueError, match=match):
            DPOObjective(**bad)


def test_reference_equal_to_policy_gives_log2_and_zero_rewards():
    cfg = C.tiny(vocab_size=VOCAB, num_kv_heads=2, init_std=0.1, dropout=0.1)
    policy = Qwen(cfg, rngs=nnx.Rngs(0))
    reference = nnx.clone(policy)
    batch = _batch(5, seed=3, padding_rows=3)
    sums = _sums(DPOObjective(beta=0.5, chunk=8))
    loss, m = sums(policy, reference, batch, None)
    assert float(m["pairs"]) == 5.0  # the padding rows weigh nothing
    np.testing.assert_allclose(float(loss) / 5, math.log(2), rtol=1e-7)
    assert float(m["rewards_chosen"]) == float(m["rewards_rejected"]) == 0.0
    assert float(m["reward_accuracy"]) == float(m["reward_margin"]) == 0.0
    assert float(m["logps_chosen"]) < 0 and float(m["logps_rejected"]) < 0
    # A dropout key reaches the policy only: the reference (same weights) runs without dropout.
    loss_dropout, _ = sums(policy, reference, batch, jax.random.key(0))
    assert abs(float(loss_dropout) / 5 - math.log(2)) > 1e-3


def test_precomputed_reference_gives_what_the_frozen_copy_gives():
    """Both loss types, the two reference modes, and the IPO per-token counts (response tokens
    incl. the end token) against numpy from the per-pair log-probs; one compile."""
    policy, reference = _model(0), _model(1)
    batch = _batch(6, seed=4, padding_rows=2)
    kinds = [(t, r) for t in ("sigmoid", "ipo") for r in ("model", "precomputed")]

    @nnx.jit
    def run(policy, reference, batch):
        ref = precompute_reference_logps(reference, batch, chunk=8)
        sums = {
            (t, r): DPOObjective(beta=0.2, loss_type=t, reference=r, chunk=8).loss_sums(
                policy, batch | ref, StepContext(reference=reference if r == "model" else None)
            )
            for t, r in kinds
        }
        return sums, pair_logps(policy, batch, chunk=8), ref

    sums, (pc, pr), ref = run(policy, reference, batch)
    for t in ("sigmoid", "ipo"):
        (loss, m), (loss_pre, m_pre) = sums[t, "model"], sums[t, "precomputed"]
        assert float(loss_pre) == pytest.approx(float(loss), rel=1e-6)
        for k in m:
            assert float(m_pre[k]) == pytest.approx(float(m[k]), rel=1e-6, abs=1e-6), k
        assert float(m["reward_margin"]) != 0.0

    real = slice(0, 6)
    c = np.asarray(pc - ref["ref_chosen_logps"], np.float64)[real]
    r = np.asarray(pr - ref["ref_rejected_logps"], np.float64)[real]
    n_c, n_r = (
        np.asarray(batch[f"{k}_lengths"] - batch["prompt_lengths"])[real]
        for k in ("chosen", "rejected")
    )
    ipo = np.sum((c / n_c - r / n_r - 1 / (2 * 0.2)) ** 2)
    assert float(sums["ipo", "model"][0]) == pytest.approx(ipo, rel=1e-5)
    assert float(sums["sigmoid", "model"][1]["reward_margin"]) == pytest.approx(
        0.2 * np.sum(c - r), rel=1e-5
    )


def test_tiny_dpo_run_raises_heldout_reward_accuracy():
    """A rule the policy must pick up: chosen replies end GOOD, rejected ones BAD (random
    prompts and replies otherwise). Plain optax on the objective; held-out pairs are new."""
    graphdef, reference = nnx.split(_model(0))
    objective = DPOObjective(beta=0.1, chunk=T)  # one head block: the smallest backward
    train, held_out = _batch(32, seed=10), _batch(64, seed=11)

    def mean_loss(params, ref, batch):
        ctx = StepContext(reference=nnx.merge(graphdef, ref))
        loss, m = objective.loss_sums(nnx.merge(graphdef, params), batch, ctx)
        return loss / m["pairs"], m

    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, ref, batch):
        grads, m = jax.grad(mean_loss, has_aux=True)(params, ref, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, m["loss"] / m["pairs"]

    @jax.jit
    def accuracy(params, ref, batch):
        m = mean_loss(params, ref, batch)[1]
        return m["reward_accuracy"] / m["pairs"]

    params, opt_state = reference, tx.init(reference)
    # policy == reference: every implicit reward is 0, no pair is ranked right
    assert float(accuracy(params, reference, held_out)) == 0.0
    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, reference, train)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6) and losses[-1] < 0.1
    assert float(accuracy(params, reference, held_out)) >= 0.95


# ------------------------------------------------------------------------------ TRL parity


def _trl_losses(pc, pr, rc, rr, counts_c, counts_r, *, beta, loss_type, label_smoothing):
    """TRL 1.16's DPOTrainer._compute_loss on given log-probabilities: (mean loss, chosen
    rewards, rejected rewards, grads of the mean loss w.r.t. the four inputs), fp64 torch.

    `_compute_loss` is a method that runs the model; it reads the per-token log-probs from the
    model output's `log_probs` (TRL's fused head) and, with precompute_ref_logps, the reference
    log-probs from the inputs. So it is called unbound with a SimpleNamespace `self` carrying
    the attributes it reads and a stand-in model whose `log_probs` hold each response's log-prob
    at one position (zeros elsewhere; TRL sums over positions): the loss code runs unchanged on
    exactly our four inputs. The completion mask only sets the per-token counts of IPO.
    """
    import collections
    from types import SimpleNamespace

    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    leaves = [
        torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
        for x in (pc, pr, rc, rr)
    ]
    pc_t, pr_t, rc_t, rr_t = leaves
    b, t = len(pc), int(max(*counts_c, *counts_r)) + 2
    logps = torch.cat([pc_t, pr_t])[:, None]
    per_token = torch.cat([logps, torch.zeros(2 * b, t - 2, dtype=torch.float64)], dim=1)
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for row, n in enumerate([*counts_c, *counts_r]):
        mask[row, 1 : 1 + int(n)] = 1

    def model(**_):
        zeros = torch.zeros(2 * b, t - 1, dtype=torch.float64)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    identity = lambda x: x  # noqa: E731  (one process: gathering is the identity)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _total_train_tokens=0,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": rc_t,
        "ref_rejected_logps": rr_t,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    # TRL logs the batch mean of its (detached) implicit rewards; with one pair per call that
    # mean is the pair's reward.
    metrics = trainer._metrics["eval"]
    return (
        loss.item(),
        metrics["rewards/chosen"],
        metrics["rewards/rejected"],
        [x.grad.numpy() for x in leaves],
    )


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)]
)
def test_dpo_loss_rewards_and_grads_match_trl(loss_type, label_smoothing):
    pytest.importorskip("trl")
    rng = np.random.default_rng(0)
    b, beta = 6, 0.3
    pc, pr, rc, rr = (-rng.uniform(1, 30, b) for _ in range(4))
    counts_c, counts_r = rng.integers(1, 9, b), rng.integers(1, 9, b)
    # TRL 1.16's "sigmoid" ignores label_smoothing; conservative DPO's
    #   -(1 - ls) log sigmoid(beta d) - ls log sigmoid(-beta d)
    # lives in its "aot" loss, which sorts the batch's log-ratios first: called one pair at a
    # time the sort is the identity and "aot" is exactly conservative DPO. So every TRL call
    # below takes a single pair (which also makes its logged mean rewards per-pair rewards).
    trl_type = "aot" if label_smoothing else loss_type

    with jax.enable_x64(True):

        def ours(pc, pr, rc, rr):
            losses, rc_b, rr_b = dpo_loss(
                pc,
                pr,
                rc,
                rr,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                chosen_counts=jnp.asarray(counts_c),
                rejected_counts=jnp.asarray(counts_r),
            )
            return jnp.sum(losses), (losses, rc_b, rr_b)

        args = [jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr)]
        grads, (losses, r_chosen, r_rejected) = jax.grad(ours, argnums=(0, 1, 2, 3), has_aux=True)(
            *args
        )
    for i in range(b):
        one = [x[i : i + 1] for x in (pc, pr, rc, rr)]
        loss, trl_rc, trl_rr, trl_grads = _trl_losses(
            *one,
            counts_c[i : i + 1],
            counts_r[i : i + 1],
            beta=beta,
            loss_type=trl_type,
            label_smoothing=label_smoothing,
        )
        np.testing.assert_allclose(float(losses[i]), loss, rtol=1e-12)
        np.testing.assert_allclose(
            [float(r_chosen[i]), float(r_rejected[i])], [*trl_rc, *trl_rr], rtol=1e-12
        )
        # Our loss is a sum over pairs, TRL's a mean: per pair both are the pair's loss.
        np.testing.assert_allclose(
            [float(g[i]) for g in grads], [g[0] for g in trl_grads], rtol=1e-12
        )
