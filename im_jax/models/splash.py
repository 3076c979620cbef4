"""Pallas splash attention (TPU) for packed rows: causal, never across segments, GQA.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) skips the (q, kv) blocks a
causal mask rules out and masks the rest by segment id, so packed rows cost their in-segment
work instead of the full T x T matrix. It runs on TPUs, and anywhere in interpret mode (slow:
tests use small shapes).

- Grouped-query attention without repeating K/V: one MQA kernel per KV head, over that head's
  group of query heads (`make_splash_mqa`, vmapped over KV heads and rows).
- Causal by index within the row: segments are contiguous and their positions restart at
  each segment start, so index order is position order inside a segment.
- Padding (segment id 0) attends to padding inside the kernel; its outputs are zeroed after,
  as the XLA path does, so they stay finite and carry no gradient.
- Lengths that are not a multiple of the 128-position blocks are padded with segment id 0.
- Under a mesh (the trainer's `partitioning.current()` layout) the kernel runs per device in
  a `shard_map`: rows over (data, fsdp), heads over `tensor` where it divides the KV heads.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from im_jax.models import partitioning as P

BLOCK = 128  # the kernel's tile granularity
_MAX_BLOCK = 512


def block_size(length: int) -> int:
  """The largest block (512, 256 or 128) dividing the (padded) length."""
  for b in (_MAX_BLOCK, 256, BLOCK):
    if length % b == 0:
      return b
  raise ValueError(f"length {length} is not a multiple of {BLOCK}")


def _splash_lib():
  # Imported on first use: Pallas' TPU modules cost every entry point ~0.3 s otherwise.
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  return splash_attention


@functools.lru_cache(maxsize=32)
def _kernel(length: int, group: int, interpret: bool):
  splash = _splash_lib()
  b = block_size(length)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * group)
  return splash.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)


def _per_device(q, k, v, segment_ids, *, scale: float, interpret: bool):
  """q `[B, T, H, hd]`, k/v `[B, T, K, hd]`, segment_ids `[B, T]` on one device."""
  b, t, h, hd = q.shape
  kv_heads = k.shape[2]
  group = h // kv_heads
  pad = -t % BLOCK
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  length = t + pad
  kernel = _kernel(length, group, interpret)
  # [B, K, G, T, hd] queries against [B, K, T, hd] keys/values: one MQA call per KV head.
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, length, kv_heads, group, hd)
  qg = qg.transpose(0, 2, 3, 1, 4)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  segment_ids_type = _splash_lib().SegmentIds

  def row(q_row, k_row, v_row, seg_row):
    ids = segment_ids_type(q=seg_row, kv=seg_row)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, ids))(q_row, k_row, v_row)

  out = jax.vmap(row)(qg, kt, vt, segment_ids)  # [B, K, G, T, hd]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, hd)[:, :t]
  return jnp.where(segment_ids[:, :t, None, None] > 0, out, 0).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     scale: float, interpret: bool | None = None) -> jax.Array:
  """Self-attention over packed rows (see the module docstring); `[B, T, H, hd]` out.

  `interpret`: None runs the kernel compiled where the devices are TPUs, else interpreted.
  """
  layout = P.current()
  if interpret is None:
    platform = (layout.mesh.devices.flat[0].platform if layout is not None
                else jax.default_backend())
    interpret = platform != "tpu"
  run = functools.partial(_per_device, scale=scale, interpret=interpret)
  if layout is None:
    return run(q, k, v, segment_ids)
  # Heads split over `tensor` only when it divides the KV heads (then also the query heads,
  # in matching groups); rows as the layout splits them.
  kv_spec = layout.spec((P.BATCH, P.LENGTH, P.KV_HEADS, P.HEAD_DIM), k.shape)
  heads = kv_spec[2] if len(kv_spec) > 2 else None
  rows = kv_spec[0] if len(kv_spec) > 0 else None
  qkv = PartitionSpec(rows, None, heads, None)
  return jax.shard_map(run, mesh=layout.mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows)),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids)
