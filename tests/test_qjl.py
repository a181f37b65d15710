"""QJL sign sketch: κ, sketch structure, a hand-computed estimate, sign convention, and the
estimator's unbiasedness and variance over many sketch seeds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax import qjl as qjl_lib

pytestmark = pytest.mark.math

N_SEEDS = 2000
DIM = 32


@pytest.mark.parametrize("dim", [2, 8, 64, 128])
def test_kappa(dim):
  assert tqjax.make_qjl(dim, kind="gaussian").kappa == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
  # Orthogonal rows are uniform on the sphere of radius √d, so κ = √d·E|x_1| for x uniform on
  # S^{d−1}; E|x_1| is also the 1-bit Lloyd–Max centroid (E[x_1 | x_1 > 0]): cross-check the modules.
  half_mean = tqjax.lloyd_max(1, dim)[0][-1]
  assert tqjax.make_qjl(dim, kind="orthogonal").kappa == pytest.approx(math.sqrt(dim) * half_mean, rel=1e-9)


@pytest.mark.parametrize("m", [8, 32, 80])
def test_orthogonal_sketch_blocks(m):
  s = np.asarray(tqjax.make_qjl(DIM, m, seed=3, kind="orthogonal").matrix, np.float64)
  assert s.shape == (m, DIM)
  # Rows come in blocks of d orthogonal rows of norm √d (the last block may be partial).
  for i in range(0, m, DIM):
    blk = s[i : i + DIM]
    np.testing.assert_allclose(blk @ blk.T, DIM * np.eye(len(blk)), atol=1e-4, equal_nan=False)
  if m > DIM:  # different blocks are independent draws, not copies
    assert not np.allclose(s[:16], s[DIM : DIM + 16])


def test_gaussian_sketch_entries():
  s = np.asarray(tqjax.make_qjl(64, 256, seed=0, kind="gaussian").matrix, np.float64)
  assert s.shape == (256, 64)
  # 16384 i.i.d. N(0, 1) entries: mean SE = 1/128; the sample variance has SE √(2/16384) ≈ 0.011.
  assert abs(s.mean()) < 4 / 128
  assert abs(s.var() - 1) < 4 * math.sqrt(2 / s.size)


def test_sketch_is_independent_of_rotation():
  # Π and S come from different streams of one seed. For independent Haar matrices A, B:
  # E⟨A, B⟩_F = 0 with variance Σ_ij E[A_ij²]E[B_ij²] = d²·(1/d)² = 1; a shared stream would give d.
  d = 64
  pi = np.asarray(tqjax.make_rotation(d, seed=5).matrix, np.float64)
  s = np.asarray(tqjax.make_qjl(d, seed=5, kind="orthogonal").matrix, np.float64) / math.sqrt(d)
  assert abs(np.sum(pi * s)) < 5


def test_deterministic_in_seed():
  for kind in ("gaussian", "orthogonal"):
    a, b = tqjax.make_qjl(32, 48, seed=9, kind=kind), tqjax.make_qjl(32, 48, seed=9, kind=kind)
    assert np.all(np.isfinite(a.matrix))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert not np.allclose(a.matrix, tqjax.make_qjl(32, 48, seed=10, kind=kind).matrix)


def test_hand_computed_sketch():
  # S = I_4, κ = 1 (built by hand, so the arithmetic is visible). r = (1, −2, 0, 3):
  # S·r = r → bits [1, 0, 1, 1] (0 counts as +) → packed word 0b1101 = 13; ‖r‖ = √14.
  # q = (1, 1, 1, 1): S·q = q, ⟨S·q, sign(S·r)⟩ = 1 − 1 + 1 + 1 = 2,
  # estimate = ‖r‖/(κ·m)·2 = √14·2/4 = √14/2; decode = √14/4·Sᵀ·sign = √14/4·(1, −1, 1, 1).
  q = qjl_lib.Qjl("gaussian", 4, 1.0, jnp.eye(4, dtype=jnp.float32))
  packed, rnorm = tqjax.qjl_encode(q, jnp.array([1.0, -2.0, 0.0, 3.0]))
  np.testing.assert_array_equal(packed, np.array([13], np.uint32))
  assert float(rnorm) == pytest.approx(math.sqrt(14), rel=1e-6)
  est = tqjax.qjl_ip(q, jnp.ones(4), packed, rnorm)
  assert float(est) == pytest.approx(math.sqrt(14) / 2, rel=1e-6)
  want = math.sqrt(14) / 4 * np.array([1, -1, 1, 1])
  np.testing.assert_allclose(tqjax.qjl_decode(q, packed, rnorm), want, rtol=1e-6, equal_nan=False)


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_sign_convention_and_batching(kind):
  q = tqjax.make_qjl(DIM, 40, seed=1, kind=kind)
  r = jax.random.normal(jax.random.key(0), (3, 5, DIM))
  packed, rnorm = tqjax.qjl_encode(q, r)
  assert packed.shape == (3, 5, 2) and packed.dtype == jnp.uint32 and rnorm.shape == (3, 5)
  want = np.einsum("...d,md->...m", np.asarray(r, np.float64), np.asarray(q.matrix, np.float64)) >= 0
  np.testing.assert_array_equal(tqjax.unpack(packed, 1, 40), want.astype(np.uint8))
  np.testing.assert_allclose(rnorm, np.linalg.norm(np.asarray(r), axis=-1), rtol=1e-6, equal_nan=False)
  # The estimate is ⟨q, decode⟩: both are ‖r‖/(κm)·⟨S·q, sign⟩.
  qv = jax.random.normal(jax.random.key(1), (DIM,))
  dec = tqjax.qjl_decode(q, packed, rnorm)
  np.testing.assert_allclose(tqjax.qjl_ip(q, qv, packed, rnorm), dec @ qv, rtol=1e-5, atol=1e-5, equal_nan=False)


def _stacked(kind, m):
  qs = [tqjax.make_qjl(DIM, m, seed=s, kind=kind) for s in range(N_SEEDS)]
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *qs)


@jax.jit
def _errors(qjls, q, r):
  est = jax.vmap(lambda s: tqjax.qjl_ip(s, q, *tqjax.qjl_encode(s, r)))(qjls)
  return est - jnp.dot(q, r)


@pytest.fixture(scope="module")
def q_and_r():
  kq, kr = jax.random.split(jax.random.key(42))
  r = 0.3 * jax.random.normal(kr, (DIM,)) / math.sqrt(DIM)  # ‖r‖ ≈ 0.3, like a 1-bit residual
  q = jax.random.normal(kq, (DIM,)) + 2.0 * r / jnp.linalg.norm(r)  # ⟨q, r⟩ far from 0
  return q, r


@pytest.mark.parametrize("m", [16, 32, 80])
def test_estimator_unbiased_and_gaussian_variance_exact(q_and_r, m):
  q, r = q_and_r
  qq, rr, qr = (float(jnp.dot(a, b)) for a, b in ((q, q), (r, r), (q, r)))
  errs = {}
  for kind in ("gaussian", "orthogonal"):
    e = np.asarray(_errors(_stacked(kind, m), q, r), np.float64)
    errs[kind] = e
    # Unbiased: the seeds are independent draws of S, so the mean error has SE sd/√N; 3 SE.
    se = e.std(ddof=1) / math.sqrt(e.size)
    assert abs(e.mean()) < 3 * se, (kind, e.mean(), se)
    # ...and the test has power: forgetting κ would scale the estimate by 1/κ ≈ 1.25.
    assert abs(qr / qjl_lib._kappa(kind, DIM) - qr) > 10 * se
  # Gaussian rows are i.i.d., so each term Z_j = ‖r‖/κ·sign(s_j·r)(s_j·q) has E[Z_j²] = ‖r‖²‖q‖²/κ²
  # = (π/2)‖r‖²‖q‖² and the estimator's variance is exactly (π/2·‖q‖²‖r‖² − ⟨q, r⟩²)/m.
  # SE of a sample variance: √((μ4 − σ⁴)/N) with μ4 the 4th central moment; 4 SE.
  e = errs["gaussian"]
  var, mu4 = e.var(), np.mean((e - e.mean()) ** 4)
  want = (math.pi / 2 * qq * rr - qr * qr) / m
  assert abs(var - want) < 4 * math.sqrt((mu4 - var**2) / e.size), (var, want)
  # Orthogonal rows (within a block) are negatively dependent: strictly lower variance.
  eo = errs["orthogonal"]
  var_o, mu4_o = eo.var(), np.mean((eo - eo.mean()) ** 4)
  se_diff = math.sqrt((mu4 - var**2) / e.size + (mu4_o - var_o**2) / eo.size)
  assert var - var_o > 4 * se_diff, (var, var_o, se_diff)


def test_errors():
  with pytest.raises(ValueError, match="kind='rademacher'"):
    tqjax.make_qjl(32, kind="rademacher")
  for bad in (0, -3, True, 2.5):
    with pytest.raises(ValueError, match=f"sketch_dim={bad!r}"):
      tqjax.make_qjl(32, bad)
  for bad in (-1, 2.5, "7", True):
    with pytest.raises(ValueError, match=f"seed={bad!r}"):
      tqjax.make_qjl(32, seed=bad)
  with pytest.raises(ValueError, match="dim=1"):
    tqjax.make_qjl(1)


def test_argument_order_matches_make_rotation():
  """make_qjl(dim, sketch_dim, kind, *, seed) like make_rotation(dim, kind, *, seed): the seed is
  keyword-only, so a positional seed in the kind's place fails loudly instead of meaning a kind."""
  a = tqjax.make_qjl(32, 48, "gaussian", seed=9)
  assert (a.kind, a.sketch_dim) == ("gaussian", 48)
  np.testing.assert_array_equal(a.matrix, tqjax.make_qjl(32, 48, kind="gaussian", seed=9).matrix)
  with pytest.raises(ValueError, match="kind=9"):
    tqjax.make_qjl(32, 48, 9)
  with pytest.raises(TypeError):
    tqjax.make_qjl(32, 48, "gaussian", 9)


def test_array_likes_accepted():
  q = tqjax.make_qjl(8, 8, seed=2)
  r = [0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.75]
  signs, rnorm = tqjax.qjl_encode(q, r)
  want = tqjax.qjl_encode(q, jnp.asarray(r))
  np.testing.assert_array_equal(signs, want[0])
  np.testing.assert_array_equal(rnorm, want[1])
  np.testing.assert_array_equal(tqjax.qjl_ip(q, r, signs, float(rnorm)), tqjax.qjl_ip(q, jnp.asarray(r), signs, rnorm))
