"""NEFTune: uniform noise on the input embeddings during training (Jain et al., 2023).

noise = Uniform(-1, 1) * alpha / sqrt(L * d), with d the embedding width and L the length of
the *example* the token belongs to. The reference implementation uses the padded length of a
batch of one unpacked example, i.e. that example's length; with packing, the packed row's
length would shrink the noise of every example in it, so L here is the token count of the
example the token belongs to: its segment's length + 1, since shifting drops the last token
from the inputs (the reference embeds all n tokens of an example, we embed n - 1). Padding
(segment 0) gets no noise. Applied in training only: evaluation passes no random key and sees
clean embeddings.
"""

import jax
import jax.numpy as jnp

from im_jax.train.loss import segment_sums


def segment_lengths(segment_ids: jax.Array) -> jax.Array:
  """[B, T] segment ids -> [B, T] length of each token's segment (0 on padding)."""
  real = (segment_ids > 0).astype(jnp.float32)
  counts = segment_sums(real, segment_ids)  # [B, T + 1], index = segment id
  lengths = jnp.take_along_axis(counts, segment_ids, axis=1)
  return jnp.where(segment_ids > 0, lengths, 0.0)


def noise_scale(segment_ids: jax.Array, dim: int, alpha: float) -> jax.Array:
  """[B, T] per-token scale alpha / sqrt(L * d); 0 on padding."""
  lengths = segment_lengths(segment_ids) + 1.0  # + the final target (see module docstring)
  return jnp.where(segment_ids > 0, alpha / jnp.sqrt(lengths * dim), 0.0)


def add_noise(embeddings: jax.Array, segment_ids: jax.Array, alpha: float,
              rng: jax.Array) -> jax.Array:
  """Returns embeddings + NEFTune noise (computed in float32, cast back)."""
  if alpha <= 0:
    return embeddings
  scale = noise_scale(segment_ids, embeddings.shape[-1], alpha)
  unit = jax.random.uniform(rng, embeddings.shape, jnp.float32, minval=-1.0, maxval=1.0)
  noisy = embeddings.astype(jnp.float32) + unit * scale[..., None]
  return noisy.astype(embeddings.dtype)
