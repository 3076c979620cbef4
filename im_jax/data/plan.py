"""The data plan: per record, kept or why dropped, its token length, tokens cut; cached.

Every start needs each example's length (to pack rows and count batches before training)
and whether it is dropped. Encoding the whole dataset for that costs minutes at Tulu sizes,
so the plan is computed once, with every process encoding one contiguous block of the
records and one collective (`process_allgather`) combining the blocks, and then cached in
`WORKDIR/data_plan/<key>.npz` under a key of everything it depends on: the bytes of each data
file (a SHA-256: a file rewritten in place at the same size and time still changes it), the
tokenizer's files, the record format and bad-record policy, and every encoding setting
(template, loss mode, truncation, drop rule, max_seq_len). A start whose key matches reads the
file; any change re-plans. Process 0 writes it, atomically; `--dry-run` only reads.

The plan covers every record of the source; which of them train, which are held out
(`split_values`, a hash of the example) and the `max_examples` limit are applied afterwards,
so those settings reuse the same cache. Per record: 4 + 1 + 4 + 8 bytes.
"""

import dataclasses
import fnmatch
import hashlib
import itertools
import json
import logging
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from im_jax.data import encode as encode_lib
from im_jax.data import records as records_lib
from im_jax.data.offsets import write_npz
from im_jax.data.conversation import Conversation, DataError

log = logging.getLogger(__name__)

VERSION = "im_jax.data_plan.v1"
KEPT, BAD = 0, 1
REASONS = ("kept", "bad_record", "too_long", "too_short", "no_output", "no_weight")
# What a tokenizer folder's behaviour depends on (HF fast and slow tokenizers, chat templates).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges.txt", "*.jinja", "*.model", "*.tiktoken")
_MESSAGE_BYTES = 1024  # the first bad record's message, as gathered between processes
ENCODE_BATCH = 256  # records per batched tokenizer call while planning
_AGREE_TIMEOUT_MS = 30 * 60 * 1000  # a peer may still be indexing a large file


@dataclasses.dataclass
class ExamplePlan:
  lengths: np.ndarray  # int32 [N]: shifted positions of a kept example, 0 if dropped or bad
  reasons: np.ndarray  # int8 [N]: index into REASONS
  cut: np.ndarray  # int32 [N]: tokens truncation cut
  split: np.ndarray  # uint64 [N]: the held-out split's hash of each example
  bad_count: int = 0
  first_bad: tuple[str, str] | None = None  # (where, reason) of the first bad record

  def __len__(self) -> int:
    return len(self.lengths)

  @classmethod
  def concatenate(cls, plans: Sequence["ExamplePlan"]) -> "ExamplePlan":
    """Several sources' plans end to end (as `records.Concatenated` lays their records)."""
    firsts = [p.first_bad for p in plans if p.first_bad is not None]
    return cls(*(np.concatenate([getattr(p, f) for p in plans])
                 for f in ("lengths", "reasons", "cut", "split")),
               bad_count=sum(p.bad_count for p in plans), first_bad=firsts[0] if firsts else None)

  def select(self, eval_fraction: float, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) masks over records: good records, the first `max_examples` of them
    (0: all), split by the hash (`split_value`)."""
    good = self.reasons != BAD
    if max_examples > 0:
      good &= np.cumsum(good) <= max_examples
    held = good & (self.split < np.uint64(min(eval_fraction, 1.0) * 2.0**64)) \
        if eval_fraction > 0 else np.zeros_like(good)
    return good & ~held, held

  def stats(self, mask: np.ndarray) -> encode_lib.EncodeStats:
    """What encoding did to the records in `mask` (as `Encoder.encode` counts it)."""
    stats = encode_lib.EncodeStats()
    reasons = self.reasons[mask]
    stats.examples = int(mask.sum())
    stats.kept = int((reasons == KEPT).sum())
    for code, n in zip(*np.unique(reasons[reasons > BAD], return_counts=True)):
      stats.dropped[REASONS[code]] = int(n)
    cut = self.cut[mask]
    stats.truncated_examples = int((cut > 0).sum())
    stats.truncated_tokens = int(cut.sum())
    stats.kept_tokens = int(self.lengths[mask].sum())
    return stats


def split_value(conversation: Conversation) -> int:
  """A stable 64-bit hash of an example (its id, else its content): the held-out split."""
  key = conversation.id
  if key is None:
    key = json.dumps([[m.role, m.content] for m in conversation.messages])
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def plan_key(file_digests: Sequence[bytes], tokenizer_dir: pathlib.Path | None,
             settings: dict) -> str:
  """The cache key: data file contents (`Records.digests`: not names or times), the
  tokenizer's files, settings."""
  digest = hashlib.sha256(json.dumps([VERSION, settings], sort_keys=True).encode())
  for file in file_digests:
    digest.update(file)
  if tokenizer_dir is not None:  # often a model folder: its tokenizer files, not its weights
    for path in sorted(pathlib.Path(tokenizer_dir).iterdir()):
      if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_FILES):
        digest.update(path.name.encode() + b"\0" + records_lib.file_digest(path))
  return digest.hexdigest()[:32]


def gather_processes(values: np.ndarray) -> np.ndarray:
  """[processes, ...]: every process's `values` (same shape everywhere), one collective."""
  import jax  # pylint: disable=g-import-not-at-top  (only multi-process runs need it)

  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(values))


_agreements = itertools.count()  # every process asks the same questions in the same order


def all_processes(flag: bool, name: str) -> bool:
  """Whether `flag` holds on every process (all must call it). Through the coordinator's
  key-value store when there is one: a collective would compile an XLA computation first
  (seconds on a resume's critical path)."""
  import jax  # pylint: disable=g-import-not-at-top  (only multi-process runs need it)

  if jax.process_count() == 1:
    return flag
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:  # not started by jax.distributed: the collective
    return bool(gather_processes(np.asarray([flag], np.int32)).all())
  key = f"im_jax/agree/{next(_agreements)}/{name}"
  client.key_value_set(f"{key}/{jax.process_index()}", str(int(flag)))
  return all(client.blocking_key_value_get(f"{key}/{p}", _AGREE_TIMEOUT_MS) == "1"
             for p in range(jax.process_count()))


def make_plan(records: records_lib.Records, encoder: encode_lib.Encoder, *,
              on_bad_record: str = "error", process_index: int = 0, process_count: int = 1,
              gather: Callable[[np.ndarray], np.ndarray] = gather_processes) -> ExamplePlan:
  """Encodes this process's block of the records; all processes get the whole plan."""
  n = len(records)
  block = -(-n // process_count)
  lo, hi = min(n, process_index * block), min(n, (process_index + 1) * block)
  part = np.zeros((5, block), np.int64)  # length, reason, cut, split hi, split lo
  bad_count, first_bad, message = 0, -1, b""
  stop = hi
  for start in range(lo, hi, ENCODE_BATCH):  # tokenized a batch at a time
    good: list[tuple[int, Conversation]] = []
    for i in range(start, min(start + ENCODE_BATCH, stop)):
      record = records.read(i)
      if isinstance(record, records_lib.BadRecord):
        bad_count += 1
        part[1, i - lo] = BAD
        if first_bad < 0:
          first_bad = i
          message = json.dumps([record.where, record.reason]).encode()[:_MESSAGE_BYTES]
        if on_bad_record == "error":
          stop = i  # the run stops at the first bad record; the others need not be encoded
          break
        continue
      good.append((i, record))
    for (i, record), encoded in zip(good, encoder.encode_full_many([r for _, r in good])):
      split = split_value(record)
      part[2, i - lo] = encoded.truncated_tokens
      part[3, i - lo], part[4, i - lo] = split >> 32, split & 0xFFFFFFFF
      if encoded.example is None:
        part[1, i - lo] = REASONS.index(encoded.drop_reason)
      else:
        part[0, i - lo] = len(encoded.example["tokens"])
  text = np.zeros(_MESSAGE_BYTES, np.int64)
  text[:len(message)] = np.frombuffer(message, np.uint8)
  # One collective; int32 on the wire (JAX without x64), the split's halves as uint32 bits.
  mine = np.concatenate([part.astype(np.uint32).view(np.int32).ravel(),
                         np.array([bad_count, first_bad, len(message)], np.int32),
                         text.astype(np.int32)])
  everyone = gather(mine)
  parts = everyone[:, :5 * block].view(np.uint32).reshape(-1, 5, block)
  whole = np.concatenate(list(parts), axis=1)[:, :n]
  tail = everyone[:, 5 * block:]
  plan = ExamplePlan(lengths=whole[0].astype(np.int32), reasons=whole[1].astype(np.int8),
                     cut=whole[2].astype(np.int32),
                     split=(whole[3].astype(np.uint64) << np.uint64(32)) | whole[4])
  plan.bad_count = int(tail[:, 0].sum())
  firsts = [(int(t[1]), bytes(t[3:3 + int(t[2])].astype(np.uint8))) for t in tail if t[1] >= 0]
  if firsts:
    plan.first_bad = tuple(json.loads(min(firsts)[1]))
  return plan


def check_plan(plan: ExamplePlan, source: str, on_bad_record: str,
               skipped: Sequence[tuple[str, str]] = ()) -> None:
  """Raises DataError for a bad record under `error`, or when no record is good; logs the
  skipped ones (from this plan and from a reader that left them out)."""
  if plan.first_bad is not None and on_bad_record == "error":
    where, reason = plan.first_bad
    raise DataError(where, None, reason)
  bad = plan.bad_count + len(skipped)
  first = plan.first_bad or (skipped[0] if skipped else None)
  if len(plan) and plan.bad_count == len(plan):
    raise DataError(source, None, f"empty dataset: all {bad} records are bad (first: "
                    f"{first[0]}: {first[1]})")
  if bad:
    log.warning("%s: skipped %d bad record(s); first: %s: %s", source, bad, *first)


def load_cached(path: pathlib.Path) -> ExamplePlan | None:
  """The cached plan at `path`, or None when absent or unreadable (then it is re-planned)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["version"]) != VERSION:
        return None
      first = tuple(str(x) for x in f["first_bad"]) or None
      return ExamplePlan(f["lengths"], f["reasons"], f["cut"], f["split"],
                         int(f["bad_count"]), first if first else None)
  except (OSError, ValueError, KeyError) as e:
    if path.exists():
      log.warning("data plan cache %s unreadable (%s): planning again", path, e)
    return None


def save_cached(path: pathlib.Path, plan: ExamplePlan) -> None:
  write_npz(path, version=np.array(VERSION), lengths=plan.lengths, reasons=plan.reasons,
            cut=plan.cut, split=plan.split, bad_count=np.array(plan.bad_count),
            first_bad=np.array(plan.first_bad or (), dtype=str))
