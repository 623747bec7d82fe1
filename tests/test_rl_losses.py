"""qwen_jax.rl.losses / normalizer and the entropy option of token_logprobs, each against a
straightforward per-row, per-token numpy / Python loop written from the formulas, on random
inputs whose masks cover responses of different lengths at different offsets; and against TRL's
own functions where TRL 1.16 has the quantity as a function (entropy_from_logits, nanstd). TRL
1.16 keeps GRPO's k3 KL, clipped surrogate and group advantage inline in GRPOTrainer and no
longer ships a PPO trainer (GAE, value loss, masked_whiten): those are checked against the loops
only."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model.logprobs import token_logprobs
from qwen_jax.rl import losses
from qwen_jax.rl.normalizer import RunningMoments

B, T = 4, 12
# (prompt length, response length) per row: responses of different lengths and offsets, one
# running to the last position, one of a single token.
SPANS = ((2, 7), (5, 7), (1, 1), (3, 4))


def _mask():
    mask = np.zeros((B, T), np.float32)
    for b, (p, n) in enumerate(SPANS):
        mask[b, p : p + n] = 1.0
    return mask


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "logp": -np.abs(f(B, T)),
        "old": -np.abs(f(B, T)),
        "ref": -np.abs(f(B, T)),
        "adv": f(B, T),
        "values": f(B, T),
        "old_values": f(B, T),
        "returns": f(B, T),
        "rewards": f(B, T),
        "scores": f(B),
        "mask": _mask(),
    }


def _rows(mask):
    """Per row, the response positions."""
    return [list(np.nonzero(mask[b])[0]) for b in range(mask.shape[0])]


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64), rtol=tol, atol=tol)


# --- KL estimators -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(data, kind):
    formulas = {
        "k1": lambda lp, rf: lp - rf,
        "k2": lambda lp, rf: 0.5 * (lp - rf) ** 2,
        "k3": lambda lp, rf: math.exp(rf - lp) - 1.0 - (rf - lp),
    }
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            want[b, t] = formulas[kind](float(data["logp"][b, t]), float(data["ref"][b, t]))
    got = jax.jit(losses.kl_estimate, static_argnums=2)(data["logp"], data["ref"], kind)
    assert got.shape == (B, T)
    _close(got, want)


def test_kl_estimators_bias_on_samples():
    """Sampled from the policy, k1 and k3 average to the true KL (unbiased), k2 does not, and
    k3's spread is below k1's when the two distributions are close."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6) * 5)
    q = p * np.exp(rng.normal(scale=0.3, size=6))
    q /= q.sum()
    true_kl = float(np.sum(p * (np.log(p) - np.log(q))))
    x = rng.choice(6, size=200_000, p=p)
    logp, ref = jnp.asarray(np.log(p)[x])[None], jnp.asarray(np.log(q)[x])[None]
    est = {k: np.asarray(losses.kl_estimate(logp, ref, k), np.float64) for k in ("k1", "k2", "k3")}
    for k in ("k1", "k3"):
        stderr = est[k].std() / math.sqrt(x.size)
        assert abs(est[k].mean() - true_kl) < 4 * stderr, k
    assert abs(est["k2"].mean() - true_kl) > 4 * est["k2"].std() / math.sqrt(x.size)
    assert est["k3"].std() < est["k1"].std()
    assert est["k3"].min() >= 0 and est["k1"].min() < 0


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        losses.kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


# --- masked statistics -------------------------------------------------------------------------


def test_masked_mean_var_whiten(data):
    x, mask = data["adv"], data["mask"]
    vals = [float(x[b, t]) for b, ts in enumerate(_rows(mask)) for t in ts]
    n = len(vals)
    mean = sum(vals) / n
    var_biased = sum((v - mean) ** 2 for v in vals) / n
    var = var_biased * n / (n - 1)
    _close(losses.masked_mean(x, mask), mean)
    _close(losses.masked_var(x, mask), var)
    _close(losses.masked_var(x, mask, unbiased=False), var_biased)
    row_means = [sum(float(x[b, t]) for t in ts) / len(ts) for b, ts in enumerate(_rows(mask))]
    _close(losses.masked_mean(x, mask, axis=1), row_means)
    for shift in (True, False):
        want = np.zeros((B, T))
        for b, ts in enumerate(_rows(mask)):
            for t in ts:
                want[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift else mean)
        got = jax.jit(losses.whiten, static_argnums=2)(x, mask, shift)
        _close(got, want)
    # An empty mask gives 0, not NaN (a row with no response must not poison a mean).
    empty = np.zeros_like(mask)
    assert float(losses.masked_mean(x, empty)) == 0.0
    assert float(losses.masked_var(x, empty)) == 0.0


# --- GAE and PPO rewards -----------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop(data, gamma, lam):
    r, v, mask = data["rewards"], data["values"], data["mask"]
    want_adv, want_ret = np.zeros((B, T)), np.zeros((B, T))
    for b, ts in enumerate(_rows(mask)):
        last = 0.0
        for k in reversed(range(len(ts))):
            next_v = float(v[b, ts[k + 1]]) if k + 1 < len(ts) else 0.0
            delta = float(r[b, ts[k]]) + gamma * next_v - float(v[b, ts[k]])
            last = delta + gamma * lam * last
            want_adv[b, ts[k]] = last
            want_ret[b, ts[k]] = last + float(v[b, ts[k]])
    adv, ret = jax.jit(losses.gae, static_argnums=(3, 4))(r, v, mask, gamma, lam)
    _close(adv, want_adv)
    _close(ret, want_ret)


def test_ppo_token_rewards(data):
    kl, mask, scores = data["logp"] - data["ref"], data["mask"], data["scores"]
    want = np.zeros((B, T))
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            want[b, t] = -0.04 * kl[b, t]
        want[b, ts[-1]] += scores[b]
    _close(jax.jit(losses.ppo_token_rewards)(scores, kl, mask, 0.04), want)
    # A row without a response gets nothing, not its score at position 0.
    empty = mask.copy()
    empty[2] = 0.0
    got = losses.ppo_token_rewards(scores, kl, empty, 0.04)
    assert float(jnp.abs(got[2]).sum()) == 0.0


# --- clipped losses ----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_policy_loss_sums(data, eps):
    logp, old, adv, mask = data["logp"], data["old"], data["adv"], data["mask"]
    loss = clipfrac = approx_kl = 0.0
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            a, ratio = float(adv[b, t]), math.exp(float(logp[b, t]) - float(old[b, t]))
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            loss += max(unclipped, clipped)
            clipfrac += float(clipped > unclipped)
            approx_kl += 0.5 * (float(logp[b, t]) - float(old[b, t])) ** 2
    got = jax.jit(losses.policy_loss_sums, static_argnums=4)(logp, old, adv, mask, eps)
    assert 0 < clipfrac < mask.sum()  # the inputs exercise both branches
    _close(got["policy_loss"], loss)
    _close(got["clipfrac"], clipfrac)
    _close(got["approx_kl"], approx_kl)


def test_policy_loss_gradient_only_through_unclipped(data):
    """d loss / d logp = -A r where the unclipped branch is the max, 0 where the clip binds."""
    logp, old, adv, mask = (jnp.asarray(data[k]) for k in ("logp", "old", "adv", "mask"))
    grad = jax.grad(lambda lp: losses.policy_loss_sums(lp, old, adv, mask, 0.2)["policy_loss"])(
        logp
    )
    ratio = np.exp(np.asarray(logp - old))
    a = np.asarray(adv)
    clipped = -a * np.clip(ratio, 0.8, 1.2) > -a * ratio
    want = np.where(clipped, 0.0, -a * ratio) * np.asarray(mask)
    _close(grad, want)


def test_value_loss_and_explained_variance(data):
    v, old, ret, mask = data["values"], data["old_values"], data["returns"], data["mask"]
    c = 0.15
    loss = 0.0
    errs, rets = [], []
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            vc = min(max(float(v[b, t]), float(old[b, t]) - c), float(old[b, t]) + c)
            loss += 0.5 * max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2)
            errs.append(float(ret[b, t] - v[b, t]))
            rets.append(float(ret[b, t]))
    _close(jax.jit(losses.value_loss_sum)(v, old, ret, mask, c), loss)
    want_ev = 1.0 - np.var(errs, ddof=1) / np.var(rets, ddof=1)
    _close(jax.jit(losses.explained_variance)(v, ret, mask), want_ev)
    _close(losses.explained_variance(ret, ret, mask), 1.0)
    # Constant returns: nothing to explain -> 0, not NaN.
    assert float(losses.explained_variance(v, np.ones_like(ret), mask)) == 0.0


# --- GRPO ------------------------------------------------------------------------------------


def test_group_advantages_match_loop_and_trl_std():
    torch = pytest.importorskip("torch")
    from trl.trainer.utils import nanstd

    rng = np.random.default_rng(2)
    rewards = rng.integers(0, 2, size=(5, 4)).astype(np.float32)
    rewards[0] = 1.0  # a group with no signal
    rewards[1] = rng.normal(size=4)
    want = np.zeros_like(rewards, dtype=np.float64)
    want_dr = np.zeros_like(want)
    for p in range(5):
        g = [float(r) for r in rewards[p]]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / (len(g) - 1))
        for j, r in enumerate(g):
            want[p, j] = (r - mean) / (std + 1e-4)
            want_dr[p, j] = r - mean
    got = jax.jit(losses.group_advantages)(rewards)
    _close(got, want)
    _close(losses.group_advantages(rewards, scale=False), want_dr)
    assert np.all(np.asarray(got[0]) == 0.0)
    # The std is TRL's (nanstd: Bessel-corrected, as GRPOTrainer's scale_rewards="group").
    r_t = torch.tensor(rewards)
    trl_adv = (r_t - r_t.mean(1, keepdim=True)) / (nanstd(r_t, dim=1).unsqueeze(1) + 1e-4)
    _close(got, trl_adv.numpy())


# --- running moments -------------------------------------------------------------------------


def test_running_moments_merge_equals_concatenation():
    rng = np.random.default_rng(3)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (2, 7, 1, 16, 5)]
    update = jax.jit(RunningMoments.update)
    rm = RunningMoments.create()
    for i, x in enumerate(batches):
        rm = update(rm, x)
        seen = np.concatenate(batches[: i + 1]).astype(np.float64)
        _close(rm.count, seen.size)
        _close(rm.mean, seen.mean())
        if seen.size > 1:
            _close(rm.var, seen.var(ddof=1))
    x = rng.normal(size=6).astype(np.float32)
    std = np.concatenate(batches).astype(np.float64).std(ddof=1)
    _close(jax.jit(rm.normalize)(x), (x - rm.mean) / std)
    _close(rm.normalize(x, shift_mean=False), x / std)
    # The fields are fp32 scalars of a pytree (jit, Orbax); the dict form round-trips exactly.
    assert all(leaf.shape == () and leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(rm))
    d = rm.to_dict()
    assert all(type(v) is float for v in d.values())
    back = RunningMoments.from_dict(d)
    assert all(
        np.asarray(a) == np.asarray(b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(rm))
    )


def test_running_moments_before_two_values():
    rm = RunningMoments.create()
    _close(rm.normalize(jnp.asarray([2.0])), [2.0])  # nothing seen: identity
    rm = rm.update(jnp.asarray([5.0]))
    _close(rm.normalize(jnp.asarray([7.0])), [2.0])  # one value: centred, unscaled


# --- entropy option of token_logprobs ----------------------------------------------------------


def _entropy_case(t=13, v=40):
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, t, 8)).astype(np.float32)
    w = rng.normal(size=(8, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(3, t))
    return jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets)


@pytest.mark.parametrize("chunk", [13, 4])
def test_entropy_matches_full_logits_and_trl(chunk):
    torch = pytest.importorskip("torch")
    from trl.trainer.utils import entropy_from_logits

    h, w, targets = _entropy_case()
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_softmax = logits - logits.max(-1, keepdims=True) - logz
    want = -(np.exp(log_softmax) * log_softmax).sum(-1)
    logp, lse, ent = token_logprobs(h, w, targets, chunk=chunk, with_entropy=True)
    assert ent.shape == (3, 13) and ent.dtype == jnp.float32
    _close(ent, want, 2e-5)
    trl_ent = entropy_from_logits(torch.tensor(np.asarray(h) @ np.asarray(w)))
    _close(ent, trl_ent.numpy(), 2e-5)
    # The option changes nothing else.
    logp0, lse0 = token_logprobs(h, w, targets, chunk=chunk)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(logp0))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse0))


def test_entropy_option_gradients():
    h, w, targets = _entropy_case()
    g = jnp.asarray(np.random.default_rng(5).normal(size=(3, 13)).astype(np.float32))

    def logp_loss(h, w, with_entropy):
        out = token_logprobs(h, w, targets, chunk=4, with_entropy=with_entropy)
        return jnp.sum(g * out[0])

    plain = jax.grad(logp_loss, argnums=(0, 1))(h, w, False)
    with_ent = jax.grad(logp_loss, argnums=(0, 1))(h, w, True)
    for a, b in zip(with_ent, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

    def chunked_entropy(h, w):
        return jnp.sum(g * token_logprobs(h, w, targets, chunk=4, with_entropy=True)[2])

    def full_entropy(h, w):
        log_sm = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.sum(g * -(jnp.exp(log_sm) * log_sm).sum(-1))

    got = jax.grad(chunked_entropy, argnums=(0, 1))(h, w)
    want = jax.grad(full_entropy, argnums=(0, 1))(h, w)
    assert float(jnp.abs(got[0]).sum()) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_qwen_token_logprobs_passes_entropy_through():
    """Qwen.token_logprobs hands with_entropy to token_logprobs (called unbound on a stand-in
    with the head: building a model would only add seconds)."""
    import types

    from qwen_jax.model.transformer import Qwen

    h, w, targets = _entropy_case(t=5)
    stand_in = types.SimpleNamespace(
        cfg=types.SimpleNamespace(matmul_impl="xla"), _head_for=lambda h_btd: (w, None)
    )
    got = Qwen.token_logprobs(stand_in, h, targets, chunk=2, with_entropy=True)
    want = token_logprobs(h, w, targets, chunk=2, with_entropy=True)
    assert len(got) == 3
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(Qwen.token_logprobs(stand_in, h, targets, chunk=2)) == 2
