"""The reward-model objective: its sums equal a numpy computation from the model's hidden states
(reward read at each sequence's last token, the pairwise log-sigmoid loss with a margin, padding
pairs weighing nothing), and a tiny reward model trained on it ranks held-out pairs of a
learnable rule at >= 95% accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen_jax.model import config as C
from qwen_jax.model.transformer import Qwen
from qwen_jax.testing.pairs import rule_pairs
from qwen_jax.train.objectives import ObjectiveConfig, StepContext, make_objective
from qwen_jax.train.reward import RewardObjective

VOCAB, T = 64, 16
STEPS = 30


def _model(seed: int = 0) -> Qwen:
    cfg = C.tiny(vocab_size=VOCAB, num_kv_heads=2, init_std=0.1, reward_head=True)
    return Qwen(cfg, rngs=nnx.Rngs(seed))


def _batch(n: int, seed: int, padding_rows: int = 0):
    return {k: jnp.asarray(v) for k, v in rule_pairs(n, T, VOCAB, seed, padding_rows).items()}


def test_objective_config_and_features():
    obj = make_objective(ObjectiveConfig(name="reward", margin=0.5))
    assert obj == RewardObjective(margin=0.5) and not obj.needs_reference
    assert obj.weight_name == "pairs"
    abstract = obj.abstract_batch(4, 32)
    assert list(abstract) == [
        "chosen_tokens",
        "rejected_tokens",
        "chosen_lengths",
        "rejected_lengths",
        "prompt_lengths",
    ]
    assert abstract["chosen_tokens"].shape == (4, 32) and abstract["chosen_lengths"].shape == (4,)


def test_reward_sums_match_numpy():
    model = _model()
    margin = 0.3
    batch = _batch(5, seed=2, padding_rows=3)
    loss, m = nnx.jit(
        lambda mdl, b: RewardObjective(margin=margin).loss_sums(mdl, b, StepContext())
    )(model, batch)

    hidden = nnx.jit(lambda mdl, x: mdl(x, return_hidden=True)[0])
    score_d = np.asarray(model.score[...], np.float64)[:, 0]

    def rewards(kind):
        h = np.asarray(hidden(model, batch[f"{kind}_tokens"]), np.float64)
        last = np.asarray(batch[f"{kind}_lengths"])[:5] - 1
        return h[np.arange(5), last] @ score_d

    r_c, r_r = rewards("chosen"), rewards("rejected")
    d = r_c - r_r
    want = {
        "loss": np.sum(np.log1p(np.exp(-(d - margin)))),
        "accuracy": np.sum(d > 0),
        "reward_chosen": np.sum(r_c),
        "reward_rejected": np.sum(r_r),
        "margin_mean": np.sum(d),
        "pairs": 5.0,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(loss) == float(m["loss"])
    assert 0 < want["accuracy"] < 5  # the comparison sees both outcomes


def test_reward_reads_the_last_token():
    """Tokens past a row's length do not move its reward; its last token does."""
    model = _model()
    batch = _batch(4, seed=5)
    sums = nnx.jit(lambda mdl, b: RewardObjective().loss_sums(mdl, b, StepContext())[1])
    base = sums(model, batch)
    tokens = np.asarray(batch["chosen_tokens"]).copy()
    lengths = np.asarray(batch["chosen_lengths"])
    tokens[0, lengths[0] :] = 7  # overwrite the padding
    padded = sums(model, batch | {"chosen_tokens": jnp.asarray(tokens)})
    assert float(padded["reward_chosen"]) == float(base["reward_chosen"])
    tokens[0, lengths[0] - 1] = 5  # the end token itself
    moved = sums(model, batch | {"chosen_tokens": jnp.asarray(tokens)})
    assert float(moved["reward_chosen"]) != float(base["reward_chosen"])


def test_reward_model_learns_a_rule_on_heldout_pairs():
    """Chosen replies end GOOD, rejected ones BAD (random prompts and replies otherwise): after
    plain optax on the objective, held-out pairs (new prompts and replies) rank >= 95%."""
    graphdef, params = nnx.split(_model(0))
    objective = RewardObjective()
    train, held_out = _batch(32, seed=10), _batch(128, seed=11)

    def mean_loss(p, batch):
        loss, m = objective.loss_sums(nnx.merge(graphdef, p), batch, StepContext())
        return loss / m["pairs"], m

    tx = optax.adam(1e-3)

    @jax.jit
    def step(p, opt_state, batch):
        grads, m = jax.grad(mean_loss, has_aux=True)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, m["loss"] / m["pairs"]

    @jax.jit
    def accuracy(p, batch):
        m = mean_loss(p, batch)[1]
        return m["accuracy"] / m["pairs"]

    before = float(accuracy(params, held_out))
    opt_state = tx.init(params)
    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, train)
        losses.append(float(loss))
    after = float(accuracy(params, held_out))
    assert losses[-1] < 0.5 * losses[0]
    assert before < 0.75  # the untrained head ranks about at chance
    assert after >= 0.95
