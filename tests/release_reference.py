"""An independent, faithful re-implementation of the authors' release's data encoding.

`encode_with_messages_format` of their finetune.py (an open-instruct fork, src/finetune.py of
the InstructionModelling repository), rewritten with plain lists instead of torch tensors and
nothing of im_jax: render each message as header + `content.strip()` + "\\n" (assistant: +
EOS before the newline), strip the whole text, tokenize it with the tokenizer's own special
tokens, truncating to `max_seq_length`, copy the ids as labels and mask:

- IM (`use_lm_loss=True`): every window of ids equal to `tokenizer(p)` for p in
  ("wa\\n", "<|system|>\\n", "<|user|>\\n");
- IT: for each non-assistant message, ids from the length of the tokenized messages before it
  to the length of the tokenized messages up to it (plus "<|assistant|>\\n" when a reply
  follows).

Their training then drops examples with no label left (`(labels != -100).any()`).
"""

IGNORE = -100
MASKED_TEXTS = ("wa\n", "<|system|>\n", "<|user|>\n")


def concat_messages(messages, eos_token):
  text = ""
  for message in messages:
    content = message["content"].strip()
    if message["role"] == "system":
      text += "<|system|>\n" + content + "\n"
    elif message["role"] == "user":
      text += "<|user|>\n" + content + "\n"
    elif message["role"] == "assistant":
      text += "<|assistant|>\n" + content + eos_token + "\n"
    else:
      raise ValueError(f"Invalid role: {message['role']}")
  return text


def _ids(tokenizer, text, max_seq_length):
  return tokenizer(text, max_length=max_seq_length, truncation=True)["input_ids"]


def encode_with_messages_format(messages, tokenizer, max_seq_length, use_lm_loss):
  """(input_ids, labels) as the release computes them for one example."""
  if not messages:
    raise ValueError("messages field is empty.")
  input_ids = _ids(tokenizer, concat_messages(messages, tokenizer.eos_token).strip(),
                   max_seq_length)
  labels = list(input_ids)

  def mask(start, end):  # torch's labels[:, start:end] = -100 clips to the length
    end = min(end, len(labels))
    labels[start:end] = [IGNORE] * max(0, end - start)

  if use_lm_loss:
    for text in MASKED_TEXTS:
      pattern = _ids(tokenizer, text, max_seq_length)
      for idx in range(len(input_ids) - len(pattern) + 1):
        if input_ids[idx:idx + len(pattern)] == pattern:
          mask(idx, idx + len(pattern))
  else:
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        continue
      start = 0 if i == 0 else len(_ids(tokenizer, concat_messages(messages[:i],
                                                                    tokenizer.eos_token),
                                        max_seq_length))
      so_far = concat_messages(messages[:i + 1], tokenizer.eos_token)
      if i < len(messages) - 1 and messages[i + 1]["role"] == "assistant":
        so_far += "<|assistant|>\n"
      end = len(_ids(tokenizer, so_far, max_seq_length))
      mask(start, end)
      if end >= max_seq_length:
        break
  return input_ids, labels


def kept(labels) -> bool:
  """The release's filter: an example stays when any label is left."""
  return any(label != IGNORE for label in labels)
