"""lm-evaluation-harness's model interface on the JAX model, sharded like training.

`HarnessLM(model, tokenizer, mesh=...)` is an `lm_eval.api.model.TemplateLM`: lm-eval hands
it its requests and computes the task metrics. What it must match is lm-eval's own `hf`
backend (`lm_eval.models.huggingface.HFLM`) on the same weights, request by request:

- tokenization: `TemplateLM.loglikelihood` (trailing context spaces move to the continuation,
  the pair is encoded whole and split, an empty context becomes `prefix_token_id`), with
  `tok_encode` as HFLM's (the tokenizer's own special tokens unless the text starts with BOS);
- `loglikelihood`: the input is `(context + continuation)[-(max_length + 1):][:-1]` (left
  truncation of a context that does not fit) and the score sums the log-softmax of the
  continuation's tokens; `is_greedy` when every one is the argmax;
- `loglikelihood_rolling`: lm-eval's own `get_rolling_token_windows` + `make_disjoint_window`
  windows, each scored as a `loglikelihood` request, summed;
- `generate_until`: greedy, contexts left-truncated to `max_length - max_gen_toks`, at most
  `max_gen_toks` new tokens, stopping at EOS (and a `generation_config.json`'s eos ids) or
  once a stop string appears; the text is cut at the first stop string (lm-eval's
  `postprocess_generated_text`).

Batching: scoring requests are sorted by length and packed into rows of a bucketed width
(several requests per row, each its own segment with positions from 0, attention within the
segment), `batch_size` rows per call split over the mesh's data x fsdp axes; the parameters
stay in their FSDP layout. A request's score does not depend on its batch-mates (tested against
one request at a time). Identical requests (multiple-choice contexts repeat) are scored once.
Every process computes (calls are collective); lm-eval sees one rank that gets every request.
"""

import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models import utils as model_utils

from im_jax.data.conversation import Message
from im_jax.data.templates import ChatTemplate, TemplateConfig
from im_jax.eval import generate as generate_lib
from im_jax.models import partitioning
from im_jax.train import loss as loss_lib
from im_jax.train import sharding

MIN_WIDTH = 64  # packed rows are a power of two wide, at least this: few compiled shapes


def _score(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], *,
           chunk: int, layout: Any) -> tuple[jax.Array, jax.Array]:
  """Per position: log p(target) and whether the target is the argmax, `[B, T]` each.

  The logits are formed `chunk` positions at a time: never `[B, T, V]` at once.
  """
  with partitioning.activation_layout(layout):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(model.embed(batch["tokens"]), batch["positions"],
                                 batch["segment_ids"])
    w = model.output_embedding()
    length = hidden.shape[1]
    n, (hidden, targets) = loss_lib.pad_to_chunks(chunk, hidden, batch["targets"])

    def body(carry, xs):
      h, t = xs
      logits = loss_lib.project_logits(h, w)
      log_p = loss_lib.target_logit(logits, t) - jax.nn.logsumexp(logits, axis=-1)
      return carry, (log_p, jnp.argmax(logits, axis=-1) == t)

    _, (log_p, greedy) = jax.lax.scan(
        body, None, (loss_lib.to_chunks(hidden, n), loss_lib.to_chunks(targets, n)))
    return loss_lib.from_chunks(log_p)[:, :length], loss_lib.from_chunks(greedy)[:, :length]


def _bucket(length: int) -> int:
  return max(MIN_WIDTH, 1 << (length - 1).bit_length())


def pack(lengths: Sequence[int], rows: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
  """Batches of `rows` rows: `(width, [(item, row, offset), ...])`, longest items first.

  First fit over items sorted by decreasing length; a batch's width is the bucket of its
  longest item, so later, shorter items fill the gaps of its rows.
  """
  left = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = []
  while left:
    width = _bucket(lengths[left[0]])
    fill = [0] * rows
    placed, rest = [], []
    for i in left:
      row = next((r for r in range(rows) if fill[r] + lengths[i] <= width), None)
      if row is None:
        rest.append(i)
        continue
      placed.append((i, row, fill[row]))
      fill[row] += lengths[i]
    batches.append((width, placed))
    left = rest
  return batches


class HarnessLM(TemplateLM):
  """lm-eval's `LM` on an im_jax `Llama` (see the module docstring)."""

  def __init__(self, model: nnx.Module, tokenizer: Any, *, mesh: jax.sharding.Mesh | None = None,
               batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
               template: str = "tulu", strip_content: bool | None = None,
               stop_ids: Sequence[int] | None = None, chunk_size: int = 512,
               decode_steps: int = 16):
    super().__init__()
    self.tokenizer = tokenizer
    self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
    row_axes = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.rows = -(-batch_size // row_axes) * row_axes  # every device gets whole rows
    self._max_length = max_length or model.config.max_position_embeddings
    self._max_gen_toks = max_gen_toks
    self.template, self.strip_content = template, strip_content
    self._row_sharding = sharding.batch_sharding(self.mesh, micro_batched=False)
    graphdef, self._state = nnx.split(model)
    self._score = jax.jit(functools.partial(_score, graphdef, chunk=chunk_size,
                                            layout=sharding.ActivationLayout(self.mesh)))
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    self._generator = generate_lib.MeshGreedyGenerator(
        model, self.mesh, list(stop_ids or eos), pad, steps=decode_steps)

  def update(self, model: nnx.Module) -> None:
    """Scores with `model`'s current parameters (same structure and shardings as the model
    this LM was built with: training's state at a later step); nothing recompiles."""
    self._state = nnx.split(model)[1]
    self._generator.update(model)

  # lm-eval's tokenization hooks, as its hf backend defines them.

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    del kwargs
    special = model_utils._add_special_kwargs(add_special_tokens, None)  # pylint: disable=protected-access
    if add_special_tokens is None and model_utils.has_bos_prefix(
        string, self.tokenizer.decode(self.prefix_token_id)):
      special["add_special_tokens"] = False
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    return self.template if self.template == "tulu" else self.tokenizer.chat_template

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return render_chat(self.tokenizer, self.template, self.strip_content, chat_history,
                       add_generation_prompt)

  # Scoring.

  def _put(self, array: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(array.shape, self._row_sharding,
                                        lambda index: array[index])

  def score_sequences(self, sequences: Sequence[Sequence[int]], scored: Sequence[int]
                      ) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) over the last `scored[i]` tokens of each sequence, each
    token predicted from the ones before it in its own sequence."""
    unique: dict[tuple[tuple[int, ...], int], int] = {}
    keys = [(tuple(int(t) for t in s), int(k)) for s, k in zip(sequences, scored)]
    for key in keys:
      unique.setdefault(key, len(unique))
    items = list(unique)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for width, placed in pack([len(s) - 1 for s, _ in items], self.rows):
      arrays = {name: np.zeros((self.rows, width), np.int32)
                for name in ("tokens", "positions", "segment_ids", "targets")}
      segment = [0] * self.rows
      for i, row, offset in placed:
        seq = np.asarray(items[i][0], np.int32)
        n = len(seq) - 1
        segment[row] += 1
        span = slice(offset, offset + n)
        arrays["tokens"][row, span] = seq[:-1]
        arrays["targets"][row, span] = seq[1:]
        arrays["positions"][row, span] = np.arange(n)
        arrays["segment_ids"][row, span] = segment[row]
      with jax.set_mesh(self.mesh):
        log_p, greedy = self._score(self._state, {k: self._put(v) for k, v in arrays.items()})
      log_p, greedy = (np.asarray(x) for x in jax.device_get((log_p, greedy)))
      for i, row, offset in placed:
        end = offset + len(items[i][0]) - 1
        span = slice(end - items[i][1], end)
        results[i] = (float(np.sum(log_p[row, span], dtype=np.float64)),
                      bool(np.all(greedy[row, span])))
    return [results[unique[key]] for key in keys]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    sequences, scored = [], []
    for _, context, continuation in requests:
      if not context or not continuation:
        raise ValueError("a loglikelihood request with an empty context or continuation")
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                         f"model's {self.max_length}")
      # The hf backend's left truncation: the last max_length inputs, plus the last target.
      sequences.append((list(context) + list(continuation))[-(self.max_length + 1):])
      scored.append(len(continuation))
    answers = self.score_sequences(sequences, scored)
    for (request, _, _), answer in zip(requests, answers):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return answers

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, (string,) in enumerate(request.args for request in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (log_p, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[owner] += log_p
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # Generation.

  def _context_ids(self, context: str, max_context: int) -> list[int]:
    # The hf backend's tok_batch_encode: no special tokens added to a text that has its BOS.
    bos = getattr(self.tokenizer, "bos_token", None)
    special = ({"add_special_tokens": False} if model_utils.has_bos_prefix(context, bos)
               else {})
    return self.tokenizer(context, **special)["input_ids"][-max_context:]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    out: list[str] = [""] * len(requests)
    for indices in groups.values():
      kwargs = model_utils.normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
      if kwargs.get("do_sample"):
        raise ValueError("generate_until: only greedy decoding is implemented "
                         f"(the task asks for do_sample with {kwargs})")
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_new = kwargs["max_gen_toks"]
      if max_new >= self.max_length:
        raise ValueError(f"max_gen_toks {max_new} must be below the model's max length "
                         f"{self.max_length}")
      contexts = {i: self._context_ids(requests[i].args[0], self.max_length - max_new)
                  for i in indices}
      order = sorted(indices, key=lambda i: -len(contexts[i]))
      for start in range(0, len(order), self.rows):
        chunk = order[start:start + self.rows]
        prompts = [contexts[i] for i in chunk]
        prompts += [prompts[0]] * (self.rows - len(prompts))  # whole rows for every device
        stop = lambda _row, ids: _first_stop(self.tokenizer, ids, until) < len(ids)
        for i, ids in zip(chunk, self._generator.generate(prompts, max_new, stop)):
          ids = ids[:_first_stop(self.tokenizer, ids, until)]
          text = model_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def render_chat(tokenizer: Any, template: str, strip_content: bool | None,
                chat_history: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
  """lm-eval's chat prompt as training rendered conversations (`template`, content stripping,
  BOS rule): the text whose tokens (`tok_encode`) are the training tokens before a reply.

  Without the generation prompt lm-eval continues the last (assistant) message: the prompt
  before it plus its content as is.
  """
  history = [Message(m["role"], m["content"]) for m in chat_history]
  tail = ""
  if not add_generation_prompt and history and history[-1].role == "assistant":
    tail, history = history[-1].content, history[:-1]
  chat = ChatTemplate(tokenizer, TemplateConfig(template, strip_content=strip_content))
  ids = generate_lib.prompt_ids(tokenizer, template, history, chat)
  return tokenizer.decode(ids, skip_special_tokens=False) + tail


def _first_stop(tokenizer: Any, ids: Sequence[int], until: Sequence[str]) -> int:
  """The fewest leading tokens whose text (special tokens kept) holds a stop string, or
  len(ids): where the hf backend's stopping criterion ends a row."""
  stops = [s for s in until if s]
  if not stops or not any(s in tokenizer.decode(ids, skip_special_tokens=False) for s in stops):
    return len(ids)
  return next(k for k in range(1, len(ids) + 1)
              if any(s in tokenizer.decode(ids[:k], skip_special_tokens=False) for s in stops))


def default_stop_ids(tokenizer: Any, model_dir: Any = None) -> list[int]:
  """The ids greedy generation ends on in transformers: the tokenizer's EOS and the eos ids of
  a `generation_config.json` beside the model."""
  ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
  if model_dir is not None:
    gen_file = pathlib.Path(model_dir) / "generation_config.json"
    if gen_file.exists():
      eos = json.loads(gen_file.read_text()).get("eos_token_id")
      ids += [int(i) for i in ([] if eos is None else eos if isinstance(eos, list) else [eos])]
  return sorted(set(ids))
