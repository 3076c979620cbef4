"""Weighted mixtures of data sources: the `data.train` syntax, and what an epoch of one is.

Syntax (one string, so config.json and the resume check keep one value):

    data.train = "lima.jsonl@0.3,hf:ORG/NAME:train@0.7"
    data.train = "lima.jsonl@1,alpaca.json@2@format=alpaca@template=hf@name=alpaca"

Entries are separated by `,`; each is `SOURCE@WEIGHT` followed by any of `@format=F`,
`@template=T`, `@name=N` (the name in per-source metrics; default: the file's stem, or the
Hub/TFDS dataset's name), `@loss=MODE` and `@drop_rule=RULE` (the source's loss mode and drop
rule, as loss.mode and data.drop_rule: e.g. plain instructions with loss on every token,
`instr.jsonl@1@loss=im@drop_rule=no_weight`, beside an IT source) and `@example_weight=X`
(each of its examples counts as X examples in the loss, e.g. 0.1: a tenth of an example's
weight in the per-example mean; the weight above decides how often examples are read, this
one how much each weighs). A spec with no `,` and no `@` (or naming an existing file) is one
source, read exactly as before. In a config file `spec([dict(path=..., weight=...), ...])`
writes the string.

The sources are laid end to end as one example space (source s holds the global example ids
`[offsets[s], offsets[s + 1])`), so the data plan, its cache, the row planner and the elastic
iterator serve a mixture unchanged. Each source is planned and split (held out by the same
hash) on its own.

An epoch of a mixture: N examples, N = the training examples all sources keep together. Source
s contributes q_s = N x w_s / sum(w) of them (rounded by largest remainder, so the q_s add up
to N), read on through its own stream of seeded permutations of its examples: a downsampled
source shows every example once before any repeats, an upsampled one repeats whole
permutations. The epoch's picks (a multiset of example ids, taken in id order) are then
shuffled with the run's seed as a single source's examples are, so a one-source mixture is
exactly the single-source run. `train.epochs` counts these epochs and `train.max_steps` adds
epochs as for one source. The picks are a pure function of (seed, epoch, weights, kept
examples): a resumed run on any process count continues the same batches.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from im_jax import hub
from im_jax.data import encode
from im_jax.data import sources as sources_lib
from im_jax.data import templates
from im_jax.data import weights

OPTIONS = ("format", "template", "name", "loss", "drop_rule", "example_weight")
_STREAM = 0x6D6978  # tags the per-source permutations apart from the epoch shuffle's seeds
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class MixtureError(ValueError):
  """A bad `data.train` mixture; the message is one line naming the source."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of `data.train`: where, how much, and how to read and render it."""

  spec: str  # a file, hf:ORG/NAME[:SPLIT], tfds:..., synthetic:N
  weight: float = 1.0
  format: str | None = None  # None: data.format
  template: str | None = None  # None: data.template
  name: str = ""
  loss: str | None = None  # None: loss.mode
  drop_rule: str | None = None  # None: data.drop_rule
  example_weight: float = 1.0  # what each of its examples counts as in the loss


def is_mixture(spec: str) -> bool:
  """Whether `spec` uses the mixture syntax (a path to an existing file never does)."""
  return ("," in spec or "@" in spec) and not os.path.isfile(spec)


def parse(spec: str) -> list[Source]:
  """The sources of a `data.train` value (one, weight 1, for a plain spec)."""
  if not is_mixture(spec):
    return [Source(spec, name=default_name(spec))]
  out = [_parse_entry(entry) for entry in spec.split(",")]
  seen: dict[str, str] = {}
  names: dict[str, str] = {}
  for source in out:
    where = _same_source_key(source.spec)
    if where in seen:
      raise MixtureError(f"data.train: source {source.spec} is listed twice")
    seen[where] = source.spec
    if source.name in names:
      raise MixtureError(f"data.train: sources {names[source.name]} and {source.spec} have the "
                         f"same name {source.name!r}: give one another with @name=NAME")
    names[source.name] = source.spec
  return out


def _parse_entry(entry: str) -> Source:
  parts = entry.strip().split("@")
  spec = parts[0].strip()
  if not spec:
    raise MixtureError(f"data.train: an empty source in the mixture ({entry!r})")
  if len(parts) < 2:
    raise MixtureError(f"data.train: source {spec} has no weight (write {spec}@WEIGHT)")
  weight = _positive(spec, "weight", parts[1])
  options: dict[str, str] = {}
  for option in parts[2:]:
    key, _, value = option.partition("=")
    key, value = key.strip(), value.strip()
    if key not in OPTIONS or not value:
      raise MixtureError(f"data.train: source {spec}: unknown option {option!r} (options: "
                         + ", ".join(f"{k}=..." for k in OPTIONS) + ")")
    if key in options:
      raise MixtureError(f"data.train: source {spec}: {key} is given twice")
    options[key] = value
  return _checked(Source(spec, weight, options.get("format"), options.get("template"),
                         options.get("name") or default_name(spec), options.get("loss"),
                         options.get("drop_rule"),
                         _positive(spec, "example_weight", options.get("example_weight", "1"))))


def _positive(spec: str, what: str, text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not (np.isfinite(value) and value > 0):
    raise MixtureError(f"data.train: source {spec}: {what} {text!r} is not a positive number")
  return value


def _checked(source: Source) -> Source:
  for option, choices in (("format", sources_lib.FORMATS), ("template", templates.TEMPLATES),
                          ("loss", weights.LOSS_MODES), ("drop_rule", encode.DROP_RULES)):
    value = getattr(source, option)
    if value is not None and value not in choices:
      raise MixtureError(f"data.train: source {source.spec}: unknown {option} {value!r} "
                         f"(one of {', '.join(choices)})")
  if not _NAME.fullmatch(source.name):
    raise MixtureError(f"data.train: source {source.spec}: name {source.name!r} must be "
                       "letters, digits, '_', '.' or '-'")
  return source


def default_name(spec: str) -> str:
  """A metric-friendly name: a file's stem, a Hub or TFDS dataset's name (and split)."""
  if spec.startswith(hub.PREFIX):
    base = spec[len(hub.PREFIX):].split(":")[0].rstrip("/").rsplit("/", 1)[-1]
  elif spec.startswith(sources_lib.TFDS_PREFIX):
    base = spec[len(sources_lib.TFDS_PREFIX):].split("/")[0].split(":")[0]
  else:
    base = pathlib.PurePath(spec).stem or spec
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "source"


def _same_source_key(spec: str) -> str:
  """Two entries naming one source compare equal (a local path by its absolute form)."""
  if ":" in spec.split("/", 1)[0]:  # hf:, tfds:, synthetic:
    return spec
  return str(pathlib.Path(spec).absolute())


def spec(entries: Sequence[Mapping]) -> str:
  """The `data.train` string of a mixture, for config files:
  `spec([dict(path="lima.jsonl", weight=0.3), dict(path="hf:ORG/NAME", weight=0.7,
  format="alpaca", template="hf", name="alpaca")])`."""
  parts = []
  for entry in entries:
    unknown = set(entry) - {"path", "weight", *OPTIONS}
    if unknown or "path" not in entry or "weight" not in entry:
      raise MixtureError(f"mixture entry {dict(entry)!r}: give path and weight, and only "
                         f"{', '.join(OPTIONS)} besides")
    text = f"{entry['path']}@{entry['weight']}"
    for key in OPTIONS:
      if entry.get(key):
        text += f"@{key}={entry[key]}"
    parts.append(text)
  out = ",".join(parts)
  parse(out)  # the same checks as the command line's form
  return out


@dataclasses.dataclass
class Mixture:
  """The sampling of a mixture's epochs (see the module docstring)."""

  sources: list[Source]
  offsets: np.ndarray  # [S + 1]: source s holds global ids offsets[s]..offsets[s+1]-1
  kept: list[np.ndarray]  # per source: its training examples' global ids, ascending
  seed: int

  def __post_init__(self):
    self.total = int(sum(len(k) for k in self.kept))
    weights = np.array([s.weight for s in self.sources], np.float64)
    self.shares = weights / weights.sum()
    exact = self.total * self.shares
    quotas = np.floor(exact).astype(np.int64)
    # Largest remainder: the quotas add up to N exactly (ties to the earlier source).
    for s in np.argsort(-(exact - quotas), kind="stable")[:self.total - int(quotas.sum())]:
      quotas[s] += 1
    self.quotas = quotas

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.sources]

  def identity(self) -> str:
    """What the epochs depend on besides the examples' plan (the saved position's data)."""
    text = json.dumps([[s.name, s.weight] for s in self.sources] + [self.seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def source_of(self, ids: np.ndarray) -> np.ndarray:
    """The 0-based source of each global example id."""
    return np.searchsorted(self.offsets, ids, side="right") - 1

  def _permutation(self, source: int, k: int) -> np.ndarray:
    return np.random.default_rng([self.seed, _STREAM, source, k]).permutation(
        len(self.kept[source]))

  def epoch_examples(self, epoch: int) -> np.ndarray:
    """The global ids of epoch `epoch`'s picks, ascending (repeats adjacent)."""
    picks = []
    for s, (kept, q) in enumerate(zip(self.kept, self.quotas.tolist())):
      if q == 0:
        continue
      n = len(kept)
      start, stop = epoch * q, (epoch + 1) * q  # positions in the source's stream
      first, last = start // n, (stop - 1) // n
      stream = np.concatenate([self._permutation(s, k) for k in range(first, last + 1)])
      picks.append(kept[stream[start - first * n:stop - first * n]])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)

  def describe(self) -> str:
    """The epoch's definition in one line (logged at start)."""
    parts = []
    for source, kept, q, share in zip(self.sources, self.kept, self.quotas, self.shares):
      parts.append(f"{source.name} ({source.spec}): weight {source.weight:g} = {share:.1%}, "
                   f"{q} of {len(kept)} kept examples per epoch ({q / len(kept):.2f}x)")
    return (f"data mixture: an epoch is {self.total} examples (all sources' kept training "
            "examples together), each source's share by weight, read on through its own "
            "seeded permutations; " + "; ".join(parts))


def source_table(mix_sources: Sequence[Source], offsets: np.ndarray, lengths: np.ndarray,
                 stats: Sequence[dict], held_out: Sequence[int],
                 epoch_ids: np.ndarray) -> list[dict]:
  """Per source: what it holds (`stats`: `EncodeStats.as_dict()` of its training examples)
  and its realised share of the examples and tokens of the run's epochs (`epoch_ids`: every
  planned epoch's picks, with repeats)."""
  source_of = np.searchsorted(offsets, epoch_ids, side="right") - 1
  count = np.bincount(source_of, minlength=len(mix_sources))
  tokens = np.bincount(source_of, weights=lengths[epoch_ids], minlength=len(mix_sources))
  out = []
  for s, source in enumerate(mix_sources):
    out.append({
        "name": source.name, "source": source.spec, "weight": source.weight,
        "format": source.format, "template": source.template, "loss": source.loss,
        "drop_rule": source.drop_rule, "example_weight": source.example_weight, **stats[s],
        "held_out": int(held_out[s]),
        "example_share": float(count[s] / max(count.sum(), 1)),
        "token_share": float(tokens[s] / max(tokens.sum(), 1)),
    })
  return out
