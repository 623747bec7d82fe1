"""matmul_impl="pallas" (qwen_jax.model.dispatch.matmul; TPU kernel in interpret mode on CPU)
against the model's XLA einsums.

Every dense projection (q/k/v/o, the MLP, the LM head, and the training loss's head) goes
through the kernel: logits and parameter gradients of a tiny GQA model with packed rows must
equal matmul_impl="xla" (fp32: 1e-4 abs on logits, 1e-5 relative on gradients), untied and tied
(the head is then the transposed embedding). Under a data-parallel mesh the weights are
replicated and the shard_map'd kernel must give the unsharded answer, gradients included (the
replicated weight's cotangent is summed over the batch shards); under a mesh that shards the
weights the dispatch must refuse with an error naming matmul_impl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import sharding
from qwen_jax.model import config as C
from qwen_jax.model import dispatch
from qwen_jax.model.factory import create_model
from qwen_jax.testing.configs import tiny_dispatch
from qwen_jax.testing.model_parity import assert_matches_xla
from qwen_jax.testing.tolerance import assert_grads_close
from qwen_jax.train.losses import chunked_cross_entropy


def test_pallas_matmul_model_matches_xla():
    assert_matches_xla(tiny_dispatch(), dict(matmul_impl="pallas"), 2, 24)


def test_pallas_matmul_tied_head_and_dp_mesh_match_xla():
    """Tied embeddings, batch 8 split 8 ways over a data-parallel mesh."""
    mesh = sharding.make_mesh("dp")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    cfg = tiny_dispatch(tie_embeddings=True)
    assert_matches_xla(cfg, dict(matmul_impl="pallas"), 8, 16, seed=2, mesh=mesh)


def test_pallas_matmul_loss_matches_xla():
    """The training loss's head matmul, over several remat'd sequence chunks."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 20, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 300)) * 0.1, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 300, (2, 20)))
    wt = jnp.asarray(rng.integers(0, 2, (2, 20)), jnp.float32)

    def run(impl):
        def loss(h, w):
            ce, z, _ = chunked_cross_entropy(h, w, tgt, wt, chunk=8, z_loss=1e-3, matmul_impl=impl)
            return ce + z

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)

    (want, want_g), (got, got_g) = run("xla"), run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert_grads_close(got_g, want_g)


@pytest.mark.parametrize(
    "mesh_cfg",
    [sharding.MeshConfig(data=2, fsdp=2, tensor=2), sharding.MeshConfig(data=4, fsdp=2, tensor=1)],
    ids=["2x2x2", "fsdp2"],
)
def test_sharded_weights_are_refused(mesh_cfg):
    cfg = tiny_dispatch(matmul_impl="pallas")
    mesh = sharding.make_mesh(mesh_cfg)
    model = create_model(cfg, mesh=mesh)
    tokens = jnp.zeros((4, 8), jnp.int32)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"matmul_impl='pallas'.*is sharded"):
        jax.jit(lambda t: model(t)[0])(tokens)


def test_matmul_spec_and_impl_are_checked():
    x, w = jnp.ones((2, 3, 4)), jnp.ones((5, 4))
    with pytest.raises(ValueError, match="must read"):
        dispatch.matmul("btd,nd->btn", x, w, impl="pallas")  # weight stored transposed
    with pytest.raises(ValueError, match="unknown matmul impl 'cuda'"):
        dispatch.matmul("btd,dn->btn", x, w.T, impl="cuda")
    with pytest.raises(ValueError, match="matmul_impl='cuda'"):
        C.tiny(matmul_impl="cuda")
    with pytest.raises(ValueError, match="attention_impl='cuda'"):
        C.tiny(attention_impl="cuda")


@pytest.mark.parametrize("layout", ["qwen", "qwen2"])
def test_impls_stay_out_of_hf_config(layout):
    cfg = C.tiny(C.QWEN_7B)
    kernels = cfg.replace(matmul_impl="pallas", attention_impl="pallas")
    assert C.to_hf_config(kernels, layout) == C.to_hf_config(cfg, layout)
    assert C.from_hf_config(C.to_hf_config(kernels, layout)).matmul_impl == "xla"
