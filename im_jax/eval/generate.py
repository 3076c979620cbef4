"""Batched generation with a KV cache in JAX, and AlpacaEval-format records.

Prompts are rendered with the training template plus the generation prompt (`tulu`: the
messages as in training, then `<|assistant|>\\n`; `hf`: `apply_chat_template(...,
add_generation_prompt=True)`), left-padded to a shared length (rounded up to a bucket, so few
shapes compile) with segment id 0 on the padding and per-row RoPE positions starting at 0.
One jitted function prefills the prompts into a fixed-size cache (`Llama.decode`) and then
samples one token per step in a `jax.lax.while_loop` until every row has produced a stop
token or `max_new_tokens` are reached. Greedy decoding (temperature 0) equals transformers'
greedy `generate` on the same model (tests/test_eval.py). `tulu` prompts render content as
the training run did (`strip_content`).

Stop tokens: the tokenizer's EOS, the template's end-of-turn token (what training taught the
model to end a reply with) and the `eos_token_id` of a `generation_config.json` beside the
model, when there is one.
"""

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from im_jax.data.conversation import Conversation, Message
from im_jax.data.kinds import TokenKind
from im_jax.data.templates import ChatTemplate, TemplateConfig
from im_jax.models import partitioning
from im_jax.models.llama import Llama


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  max_new_tokens: int = 512
  temperature: float = 0.0  # 0: greedy (argmax)
  batch_size: int = 8  # prompts per compiled call (the last batch is padded with copies)
  prompt_bucket: int = 64  # prompt lengths round up to a multiple: fewer compilations
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.batch_size < 1 or self.prompt_bucket < 1:
      raise ValueError("max_new_tokens, batch_size and prompt_bucket must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def split_prompt(conversation: Conversation) -> tuple[tuple[Message, ...], str]:
  """(prompt messages, instruction): the messages before the last assistant turn, and the
  last user message among them (AlpacaEval's `instruction`)."""
  messages = conversation.messages
  last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"),
                       default=len(messages))
  prompt = messages[:last_assistant]
  users = [m.content for m in prompt if m.role == "user"]
  if not users:
    raise ValueError(f"{conversation.where}: no user message before the last assistant turn")
  return prompt, users[-1]


def prompt_ids(tokenizer: Any, template: str, messages: Sequence[Message],
               chat_template: ChatTemplate | None = None) -> list[int]:
  """Token ids of the prompt plus the generation prompt, tokenized as in training.

  Training (`templates.ChatTemplate`) tokenizes the rendered string once with
  `add_special_tokens=False` and, for `tulu`, puts the tokenizer's BOS in front.
  """
  if template == "tulu":
    # Exactly the training tokens before a reply: the conversation with an empty reply, less
    # that reply's EOS. Earlier replies keep their EOS and special-token text inside a
    # message stays literal, as in training.
    chat_template = chat_template or ChatTemplate(tokenizer, TemplateConfig("tulu"))
    tokenized = chat_template.tokenize(Conversation(tuple(messages) + (Message("assistant", ""),)))
    if len(tokenized.kinds) == 0 or tokenized.kinds[-1] != TokenKind.EOS:
      raise ValueError("the tulu template needs a tokenizer with an EOS token")
    return [int(i) for i in tokenized.ids[:-1]]
  if template == "hf":
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                          for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  raise ValueError(f"template must be 'tulu' or 'hf', got {template!r}")


def stop_token_ids(tokenizer: Any, template: str,
                   model_dir: str | pathlib.Path | None = None) -> list[int]:
  """Tokenizer EOS, the template's end-of-turn token(s) and generation_config eos ids."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  # The template's end-of-turn: the EOS-kind tokens of a rendered one-turn exchange.
  probe = ChatTemplate(tokenizer, TemplateConfig(template)).tokenize(
      Conversation((Message("user", "Hi"), Message("assistant", "Hello"))))
  ids.update(int(i) for i in probe.ids[probe.kinds == TokenKind.EOS])
  if model_dir is not None:
    gen_file = pathlib.Path(model_dir) / "generation_config.json"
    if gen_file.exists():
      eos = json.loads(gen_file.read_text()).get("eos_token_id")
      ids.update(int(i) for i in ([] if eos is None else eos if isinstance(eos, list) else [eos]))
  if not ids:
    raise ValueError("no stop token: the tokenizer has no EOS and the template none")
  return sorted(ids)


def _sample(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, lengths: jax.Array, key: jax.Array, stop_ids: jax.Array,
            *, max_new_tokens: int, temperature: float, pad_id: int) -> jax.Array:
  """Prefill + decode loop; `[B, max_new_tokens]` new ids, `pad_id` after a row stops."""
  model: Llama = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(tokens, positions, segment_ids, cache)

  def pick(step_logits, i):
    if temperature == 0:
      return jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(jax.random.fold_in(key, i), step_logits / temperature,
                                  axis=-1).astype(jnp.int32)

  first = pick(logits[:, -1], 0)  # left padding: the last column is every row's last token
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)
  ones = jnp.ones((batch, 1), jnp.int32)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last, cache, out, done = carry
    # `last` (the token generated at step i - 1) sits at position length + i - 1.
    logits, cache = model.decode(last[:, None], (lengths + i - 1)[:, None], ones, cache)
    token = jnp.where(done, pad_id, pick(logits[:, 0], i))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, token, cache, out, done | jnp.isin(token, stop_ids)

  carry = (jnp.ones((), jnp.int32), first, cache, out, done)
  return jax.lax.while_loop(cond, body, carry)[3]


class Generator:
  """Generates continuations of token-id prompts with one model (compiled per prompt bucket)."""

  def __init__(self, model: Llama, stop_ids: Sequence[int], config: GenerateConfig,
               pad_id: int | None = None):
    self.config = config
    self.stop_ids = [int(i) for i in stop_ids]
    self.pad_id = self.stop_ids[0] if pad_id is None else int(pad_id)
    self._graphdef, self._state = nnx.split(model)
    self._run = jax.jit(functools.partial(
        _sample, self._graphdef, max_new_tokens=config.max_new_tokens,
        temperature=float(config.temperature), pad_id=self.pad_id))
    self._key = jax.random.PRNGKey(config.seed)
    self._calls = 0

  def _batch(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    cfg = self.config
    rows = list(prompts) + [prompts[0]] * (cfg.batch_size - len(prompts))
    longest = max(len(p) for p in rows)
    width = -(-longest // cfg.prompt_bucket) * cfg.prompt_bucket
    tokens = np.full((len(rows), width), self.pad_id, np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for r, prompt in enumerate(rows):
      n = len(prompt)
      tokens[r, width - n:] = prompt
      positions[r, width - n:] = np.arange(n)
      segments[r, width - n:] = 1
    lengths = np.asarray([len(p) for p in rows], np.int32)
    key = jax.random.fold_in(self._key, self._calls)
    self._calls += 1
    out = np.asarray(self._run(self._state, tokens, positions, segments, lengths, key,
                               np.asarray(self.stop_ids, np.int32)))
    return [self._until_stop(row) for row in out[:len(prompts)]]

  def _until_stop(self, row: np.ndarray) -> list[int]:
    stops = np.flatnonzero(np.isin(row, self.stop_ids))
    return row[:stops[0] if len(stops) else len(row)].tolist()

  def generate_ids(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """New token ids per prompt, without the stop token; batches of similar lengths."""
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    size = self.config.batch_size
    for start in range(0, len(order), size):
      chunk = order[start:start + size]
      for i, ids in zip(chunk, self._batch([prompts[i] for i in chunk])):
        results[i] = ids
    return results


def generate_records(conversations: Sequence[Conversation], model: Llama, tokenizer: Any,
                     template: str, config: GenerateConfig, generator_name: str,
                     model_dir: str | pathlib.Path | None = None,
                     strip_content: bool | None = None) -> list[dict[str, str]]:
  """AlpacaEval records `{instruction, output, generator}`, one per conversation, in order.

  `strip_content`: the training run's `data.strip_content` (None: the template's default), so
  prompts are rendered as training rendered its examples.
  """
  split = [split_prompt(c) for c in conversations]
  chat_template = ChatTemplate(tokenizer, TemplateConfig(template, strip_content=strip_content))
  prompts = [prompt_ids(tokenizer, template, messages, chat_template) for messages, _ in split]
  generator = Generator(model, stop_token_ids(tokenizer, template, model_dir), config,
                        pad_id=tokenizer.pad_token_id)
  outputs = generator.generate_ids(prompts)
  return [{"instruction": instruction,
           "output": tokenizer.decode(ids, skip_special_tokens=True).strip(),
           "generator": generator_name}
          for (_, instruction), ids in zip(split, outputs)]


# Greedy generation on a mesh, in chunks of decode steps: between chunks the host may stop rows
# on what they decoded to (lm-eval's string stop sequences), which a device loop cannot test.


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
             segment_ids: jax.Array, *, cache_len: int, layout: Any
             ) -> tuple[jax.Array, Any]:
  """(greedy first new token `[B]`, the cache holding the left-padded prompts)."""
  with partitioning.activation_layout(layout):
    model: Llama = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], cache_len)
    logits, cache = model.decode(tokens, positions, segment_ids, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _decode_steps(graphdef: nnx.GraphDef, state: nnx.State, cache: Any, last: jax.Array,
                  lengths: jax.Array, start: jax.Array, done: jax.Array, stop_ids: jax.Array,
                  *, steps: int, pad_id: int, layout: Any
                  ) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
  """`steps` greedy tokens (new-token indices start..start+steps-1) after `last` (index
  start - 1): `(tokens [B, steps], last token, cache, done)`; `pad_id` once a row is done."""
  with partitioning.activation_layout(layout):
    model: Llama = nnx.merge(graphdef, state)
    ones = jnp.ones((last.shape[0], 1), jnp.int32)

    def body(j, carry):
      last, cache, out, done = carry
      # The token with new-token index i - 1 sits at position length + i - 1.
      logits, cache = model.decode(last[:, None], (lengths + start + j - 1)[:, None], ones,
                                   cache)
      token = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
      out = jax.lax.dynamic_update_slice(out, token[:, None], (0, j))
      return token, cache, out, done | jnp.isin(token, stop_ids)

    out = jnp.full((last.shape[0], steps), pad_id, jnp.int32)
    last, cache, out, done = jax.lax.fori_loop(0, steps, body, (last, cache, out, done))
    return out, last, cache, done


class MeshGreedyGenerator:
  """Greedy continuations of token-id prompts with rows sharded over the mesh's data x fsdp
  axes (the parameters stay in their FSDP layout), stopping each row on a stop token id or
  when `stop(row_index, new_ids)` says so; the host asks after every `steps` tokens.

  Same prompts layout as `Generator` (left padding, segment id 0, positions from 0), so a
  row's tokens do not depend on its batch-mates.
  """

  def __init__(self, model: Llama, mesh: jax.sharding.Mesh, stop_ids: Sequence[int],
               pad_id: int, *, steps: int = 16, prompt_bucket: int = 64):
    from im_jax.train import sharding  # pylint: disable=g-import-not-at-top  (mesh helpers)

    self.mesh, self.steps, self.prompt_bucket = mesh, steps, prompt_bucket
    self.stop_ids = np.asarray(sorted({int(i) for i in stop_ids}), np.int32)
    self.pad_id = int(pad_id)
    self._rows = sharding.batch_sharding(mesh, micro_batched=False)
    layout = sharding.ActivationLayout(mesh)
    graphdef, self._state = nnx.split(model)
    self._prefill = jax.jit(functools.partial(_prefill, graphdef, layout=layout),
                            static_argnames=("cache_len",))
    self._decode = jax.jit(functools.partial(_decode_steps, graphdef, steps=steps,
                                             pad_id=self.pad_id, layout=layout))

  def update(self, model: Llama) -> None:
    """Generates with `model`'s parameters (same structure and shardings): no recompile."""
    self._state = nnx.split(model)[1]

  def _put(self, array: np.ndarray) -> jax.Array:
    # Every process holds the same host rows; each places the shards its devices own.
    return jax.make_array_from_callback(array.shape, self._rows, lambda index: array[index])

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New ids per prompt (one batch: pad `prompts` to a multiple of the row axes first),
    cut before the first stop token id; at most `max_new_tokens`."""
    rows = len(prompts)
    width = -(-max(len(p) for p in prompts) // self.prompt_bucket) * self.prompt_bucket
    tokens = np.full((rows, width), self.pad_id, np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for r, prompt in enumerate(prompts):
      tokens[r, width - len(prompt):] = prompt
      positions[r, width - len(prompt):] = np.arange(len(prompt))
      segments[r, width - len(prompt):] = 1
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    chunks = -(-(max_new_tokens - 1) // self.steps)
    with jax.set_mesh(self.mesh):
      last, cache = self._prefill(self._state, self._put(tokens), self._put(positions),
                                  self._put(segments), cache_len=width + 1 + chunks * self.steps)
      out = [np.asarray(jax.device_get(last))[:, None]]
      done = np.isin(out[0][:, 0], self.stop_ids).copy()
      new = 1
      lengths_d = self._put(lengths)
      while new < max_new_tokens and not done.all():
        if stop is not None:
          ids = np.concatenate(out, axis=1)
          done |= np.asarray([not d and stop(r, _until_ids(ids[r], self.stop_ids))
                              for r, d in enumerate(done)])
          if done.all():
            break
        step_out, last, cache, done_d = self._decode(
            self._state, cache, last, lengths_d, np.int32(new), self._put(done),
            self.stop_ids)
        out.append(np.asarray(jax.device_get(step_out)))
        done = np.array(jax.device_get(done_d))
        new += self.steps
    ids = np.concatenate(out, axis=1)[:, :max_new_tokens]
    return [_until_ids(row, self.stop_ids) for row in ids]


def _until_ids(row: np.ndarray, stop_ids: np.ndarray) -> list[int]:
  stops = np.flatnonzero(np.isin(row, stop_ids))
  return row[:stops[0] if len(stops) else len(row)].tolist()
