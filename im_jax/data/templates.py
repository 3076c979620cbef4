"""Chat templates: render a conversation, tokenize it once, and give every token a kind.

The method (both templates):
1. Render the conversation to one string, recording the character span of every message's
   content and of every end-of-turn (EOS) text closing an assistant turn.
2. Tokenize the whole string once, with `add_special_tokens=False`, keeping character offsets.
   The ids are what the model sees at inference.
3. A token containing any character of a message's content takes that message's kind (BPE
   merges content with template whitespace); a token inside an assistant-closing EOS span is
   `eos`; everything else the template added is `template`. A prepended BOS id is `bos`.

Special-token text inside message content (say a user writing "<|im_end|>") stays plain text:
when content holds such text, the string is cut at the special tokens the *template* placed and
the pieces between are tokenized with special-token matching off. Cutting at special tokens is
what the tokenizer does itself before its normaliser and pre-tokenizer run, so for content
without special text both paths give the same ids (tested).

Templates:
- `tulu`: the paper's format as its release renders it: `<|system|>\n{c}\n`, `<|user|>\n{c}\n`,
  `<|assistant|>\n{c}{eos}\n` with each content `c` stripped of surrounding whitespace
  (`strip_content`, default on), the whole string stripped, and in front the special tokens
  the tokenizer itself adds to a text (LLaMA-2's BOS; none for SmolLM2, whose declared BOS
  `<|im_start|>` it never adds), as the release's `tokenizer(text)` call does.
- `hf`: the tokenizer's own chat template (`apply_chat_template(tokenize=False)`), no
  `{% generation %}` markers needed. Content is located by rendering once with sentinel
  placeholders and once for real; templates may strip content whitespace and inject text (a
  default system prompt, a date header), which is `template`. The EOS of an assistant turn is
  the first special token after the content when only whitespace lies in between (`<|im_end|>`,
  `<|eot_id|>`, `</s>`, `<end_of_turn>`); a template closing an assistant turn otherwise is
  rejected. The first token is `bos` when it is the tokenizer's BOS id and that id does not
  recur (SmolLM2's GGUF BOS is `<|im_start|>`, which there is a role header: `template`).
"""

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

from im_jax.data.conversation import Conversation
from im_jax.data.kinds import KIND_DTYPE, ROLE_KINDS, TokenKind

TEMPLATES = ("tulu", "hf")
_SENTINEL = "\ue000{}\ue001"  # private-use code points: never in real text, never stripped
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
  name: str = "tulu"  # tulu | hf
  # tulu only; None: what the tokenizer adds in front of a text (its own BOS behaviour)
  add_bos: bool | None = None
  # strip each message's content (the paper's release); None: tulu strips, hf leaves it to
  # the tokenizer's template (which may trim, as Llama 3's does); True with hf is refused, as
  # an exported template could not reproduce it
  strip_content: bool | None = None

  def __post_init__(self):
    if self.name not in TEMPLATES:
      raise ValueError(f"template must be one of {TEMPLATES}, got {self.name!r}")
    if self.add_bos is not None and self.name != "tulu":
      raise ValueError("add_bos applies to the tulu template only")
    if self.strip_content not in (None, True, False):
      raise ValueError(f"strip_content must be true, false or unset, got {self.strip_content!r}")
    if self.strip_content and self.name != "tulu":
      raise ValueError("strip_content applies to the tulu template; the hf template renders "
                       "content as the tokenizer's chat template does")

  @property
  def strips(self) -> bool:
    return self.name == "tulu" if self.strip_content is None else self.strip_content


def prefix_ids(tokenizer: Any) -> list[int]:
  """The ids the tokenizer itself puts in front of every text (LLaMA-2: [BOS]; SmolLM2: [])."""
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a")["input_ids"]
  start = next((i for i in range(len(full) - len(plain) + 1)
                if full[i:i + len(plain)] == plain), None)
  if start is None or start + len(plain) != len(full):
    raise ValueError("the tulu template supports tokenizers that add special tokens only in "
                     f"front of a text; this one turns 'a' into {full}")
  return full[:start]


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  """One conversation as token ids with per-token kinds and provenance."""

  ids: np.ndarray  # int32 [n]
  kinds: np.ndarray  # int8 [n], TokenKind
  message_index: np.ndarray  # int32 [n]: message a content/EOS token belongs to, else -1
  offsets: np.ndarray  # int32 [n, 2]: character span in `text` (a prepended BOS: (0, 0))
  text: str  # the rendered string (without a prepended BOS)
  content_spans: tuple[tuple[int, int, int], ...]  # (start, end, message index) in `text`

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass(frozen=True)
class _Rendered:
  text: str
  content_spans: list[tuple[int, int, int]]  # (start, end, message index)
  eos_spans: list[tuple[int, int, int]]  # (start, end, assistant message index)
  roles: tuple[str, ...]  # role of each message


class ChatTemplate:
  """Renders and tokenizes conversations for one HF tokenizer and template."""

  def __init__(self, tokenizer: Any, config: TemplateConfig):
    self.config = config
    self.tokenizer = tokenizer
    # Own copy of the Rust tokenizer: no post-processor (it may trim offsets; with
    # add_special_tokens=False it adds nothing); `_literal` (made when first needed: a copy
    # costs a fraction of a second) reads special text literally.
    self._state = tokenizer.backend_tokenizer.to_str()
    self._plain = self._own_copy()
    special = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                     key=len, reverse=True)
    self._special_ids = {s: self._plain.token_to_id(s) for s in special}
    self._special_re = re.compile("|".join(map(re.escape, special))) if special else None
    self.bos_id = tokenizer.bos_token_id
    if config.name == "tulu":
      if tokenizer.eos_token is None:
        raise ValueError("the tulu template needs a tokenizer with an EOS token")
      if config.add_bos is None:
        self.prefix_ids = prefix_ids(tokenizer)
      elif config.add_bos and self.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
      else:
        self.prefix_ids = [self.bos_id] if config.add_bos else []
    else:
      if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the hf template needs a tokenizer with a chat template")
      self.prefix_ids = []

  def _own_copy(self, literal: bool = False) -> tokenizers.Tokenizer:
    own = tokenizers.Tokenizer.from_str(self._state)
    own.encode_special_tokens = literal
    own.post_processor = None
    # a call like tokenizer(text, max_length=..., truncation=True) leaves its truncation
    # (and padding) in the state: training truncates by itself, after kinds are known
    own.no_truncation()
    own.no_padding()
    return own

  @functools.cached_property
  def _literal(self) -> tokenizers.Tokenizer:
    return self._own_copy(literal=True)

  def tokenize(self, conversation: Conversation) -> TokenizedConversation:
    rendered = self._render(conversation)
    return self._tokenized(rendered, *self._encode(rendered))

  def tokenize_many(self, conversations: Sequence[Conversation]) -> list[TokenizedConversation]:
    """`tokenize` of each, the plain texts in one batched tokenizer call (the Rust library
    encodes a batch on its own threads, with one call's overhead)."""
    rendered = [self._render(c) for c in conversations]
    pieces = [self._special_pieces(r) for r in rendered]
    plain = [i for i, p in enumerate(pieces) if p is None]
    encodings = dict(zip(plain, self._plain.encode_batch([rendered[i].text for i in plain],
                                                         add_special_tokens=False)))
    out = []
    for i, r in enumerate(rendered):
      if i in encodings:
        ids, offsets = _ids_offsets(encodings[i])
      else:
        ids, offsets = self._encode_pieces(r.text, pieces[i])
      out.append(self._tokenized(r, ids, offsets))
    return out

  def _render(self, conversation: Conversation) -> _Rendered:
    if self.config.strips:  # tulu only
      conversation = dataclasses.replace(conversation, messages=tuple(
          dataclasses.replace(m, content=m.content.strip()) for m in conversation.messages))
    if self.config.name == "tulu":
      return self._render_tulu(conversation)
    return self._render_hf(conversation)

  def _tokenized(self, rendered: _Rendered, ids: np.ndarray,
                 offsets: np.ndarray) -> TokenizedConversation:
    kinds, message_index = _assign_kinds(rendered, offsets)
    if self.prefix_ids:
      n = len(self.prefix_ids)
      ids = np.concatenate([self.prefix_ids, ids])
      offsets = np.concatenate([np.zeros((n, 2), np.int32), offsets])
      kinds = np.concatenate([[TokenKind.BOS] * n, kinds])
      message_index = np.concatenate([[-1] * n, message_index])
    elif (self.config.name == "hf" and len(ids) and ids[0] == self.bos_id
          and not np.any(ids[1:] == self.bos_id)):
      kinds[0] = TokenKind.BOS  # a BOS id that recurs is a role header (SmolLM2's GGUF BOS)
    return TokenizedConversation(
        ids=ids.astype(np.int32), kinds=kinds.astype(KIND_DTYPE),
        message_index=message_index.astype(np.int32), offsets=offsets.astype(np.int32),
        text=rendered.text, content_spans=tuple(rendered.content_spans))

  # --- rendering -------------------------------------------------------------------------

  def _render_tulu(self, conversation: Conversation) -> _Rendered:
    eos = self.tokenizer.eos_token
    parts, content_spans, eos_spans, pos = [], [], [], 0
    for i, message in enumerate(conversation.messages):
      header = f"<|{message.role}|>\n"
      parts.append(header)
      pos += len(header)
      content_spans.append((pos, pos + len(message.content), i))
      parts.append(message.content)
      pos += len(message.content)
      if message.role == "assistant":
        eos_spans.append((pos, pos + len(eos), i))
        parts.append(eos)
        pos += len(eos)
      parts.append("\n")
      pos += 1
    # The paper strips the string; it starts with a role header, so only the end changes.
    text = "".join(parts).rstrip()
    return _Rendered(text, _clip(content_spans, len(text)), _clip(eos_spans, len(text)),
                     _roles(conversation))

  def _render_hf(self, conversation: Conversation) -> _Rendered:
    messages = conversation.messages
    real = self._apply(conversation, [m.content for m in messages])
    with_sentinels = self._apply(conversation, [_SENTINEL.format(i) for i in range(len(messages))])
    # pieces alternate: template text, sentinel index, template text, ...
    pieces = _SENTINEL_RE.split(with_sentinels)
    order = [int(x) for x in pieces[1::2]]
    if len(set(order)) != len(order):
      raise ValueError("the chat template repeats a message's content; unsupported")
    text_parts, content_spans, pos = [pieces[0]], [], len(pieces[0])
    if not real.startswith(pieces[0]):
      raise ValueError("the chat template does not render content as plain text")
    for k, i in enumerate(order):
      after = pieces[2 * k + 2]
      content = messages[i].content
      for candidate in (content, content.strip(), content.rstrip(), content.lstrip()):
        if real.startswith(candidate + after, pos):
          break
      else:
        raise ValueError(f"cannot locate message {i} in the rendered chat template; the "
                         "template transforms message content")
      content_spans.append((pos, pos + len(candidate), i))
      text_parts += [candidate, after]
      pos += len(candidate) + len(after)
    if "".join(text_parts) != real:
      raise ValueError("the chat template does not render content as plain text")
    rendered_ids = {i for _, _, i in content_spans}
    for i, message in enumerate(messages):
      if message.role == "assistant" and i not in rendered_ids:
        raise ValueError(f"the chat template dropped assistant message {i}")
    return _Rendered(real, content_spans, self._hf_eos_spans(real, content_spans, messages),
                     _roles(conversation))

  def _apply(self, conversation: Conversation, contents: list[str]) -> str:
    messages = [{"role": m.role, "content": c} for m, c in zip(conversation.messages, contents)]
    return self.tokenizer.apply_chat_template(messages, tokenize=False)

  def _hf_eos_spans(self, text, content_spans, messages) -> list[tuple[int, int, int]]:
    eos_spans = []
    for start, end, i in content_spans:
      if messages[i].role != "assistant":
        continue
      match = self._special_re.search(text, end) if self._special_re else None
      if match is None or text[end:match.start()].strip():
        raise ValueError(
            "the chat template does not close an assistant turn with a special token right "
            f"after its content (found {text[end:end + 20]!r})")
      eos_spans.append((match.start(), match.end(), i))
    return eos_spans

  # --- tokenizing ------------------------------------------------------------------------

  def _encode(self, rendered: _Rendered) -> tuple[np.ndarray, np.ndarray]:
    pieces = self._special_pieces(rendered)
    if pieces is None:
      return _ids_offsets(self._plain.encode(rendered.text, add_special_tokens=False))
    return self._encode_pieces(rendered.text, pieces)

  def _special_pieces(self, rendered: _Rendered) -> list[re.Match] | None:
    """None when no message holds special-token text (the text is encoded whole), else the
    special tokens the template placed (`_encode_pieces`)."""
    matches = list(self._special_re.finditer(rendered.text)) if self._special_re else []
    inside = [m for m in matches if _overlaps(m.start(), m.end(), rendered.content_spans)]
    return [m for m in matches if m not in inside] if inside else None

  def _encode_pieces(self, text: str, placed: list[re.Match]) -> tuple[np.ndarray, np.ndarray]:
    """Special tokens only where the template put them; content's special text stays text."""
    ids, offsets, pos = [], [], 0
    for match in placed + [None]:
      end = len(text) if match is None else match.start()
      if end > pos:
        encoding = self._literal.encode(text[pos:end], add_special_tokens=False)
        ids += encoding.ids
        offsets += [(s + pos, e + pos) for s, e in encoding.offsets]
      if match is not None:
        ids.append(self._special_ids[match.group()])
        offsets.append((match.start(), match.end()))
        pos = match.end()
    return np.asarray(ids, np.int64), np.asarray(offsets, np.int64).reshape(-1, 2)

  def encode_text_literal(self, text: str) -> list[int]:
    """Tokenizes text with special-token matching off (used by tests and previews)."""
    return self._literal.encode(text, add_special_tokens=False).ids


def _ids_offsets(encoding: tokenizers.Encoding) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(encoding.ids, np.int64), np.asarray(encoding.offsets, np.int64)


def _roles(conversation: Conversation) -> tuple[str, ...]:
  return tuple(m.role for m in conversation.messages)


def _clip(spans, length):
  return [(min(s, length), min(e, length), i) for s, e, i in spans]


def _overlaps(start, end, spans) -> bool:
  return any(start < e and s < end for s, e, _ in spans)


def _assign_kinds(rendered: _Rendered, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Token kinds from character kinds, vectorised over tokens."""
  n_chars = len(rendered.text)
  char_kind = np.full(n_chars + 1, int(TokenKind.TEMPLATE), np.int8)
  char_message = np.full(n_chars + 1, -1, np.int32)
  is_content = np.zeros(n_chars + 1, bool)
  is_eos = np.zeros(n_chars + 1, bool)
  for start, end, i in rendered.content_spans:
    char_kind[start:end] = ROLE_KINDS[rendered.roles[i]]
    char_message[start:end] = i
    is_content[start:end] = True
  for start, end, i in rendered.eos_spans:
    char_kind[start:end] = TokenKind.EOS
    char_message[start:end] = i
    is_eos[start:end] = True
  starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0])
  content_before = np.concatenate([[0], np.cumsum(is_content)])
  eos_before = np.concatenate([[0], np.cumsum(is_eos)])
  has_content = content_before[ends] > content_before[starts]
  has_eos = eos_before[ends] > eos_before[starts]
  # index of the first content (or EOS) character at or after each position
  index = np.arange(n_chars + 1)
  next_content = np.minimum.accumulate(np.where(is_content, index, n_chars)[::-1])[::-1]
  next_eos = np.minimum.accumulate(np.where(is_eos, index, n_chars)[::-1])[::-1]
  kinds = np.full(len(offsets), int(TokenKind.TEMPLATE), np.int8)
  message_index = np.full(len(offsets), -1, np.int32)
  pick_eos = has_eos & ~has_content
  kinds[pick_eos] = TokenKind.EOS
  message_index[pick_eos] = char_message[next_eos[starts[pick_eos]]]
  kinds[has_content] = char_kind[next_content[starts[has_content]]]
  message_index[has_content] = char_message[next_content[starts[has_content]]]
  return kinds, message_index
