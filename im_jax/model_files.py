"""The files of a Hugging Face model folder, read with their damage named: one line per fault.

A model folder can be damaged in ways its libraries report badly (an interrupted download or
copy cuts a `.safetensors` file short; a shard named in the index is missing; a JSON file is
cut or empty): safetensors says "incomplete metadata, file not fully covered" without naming
the file, the tokenizers library raises a bare `Exception`. Here every such fault is a
`ModelFileError` whose message is `FILE: what is wrong`, found before any tensor is read:

- `read_json(path)`: a JSON object (config.json, the index, tokenizer JSON files);
- `read_safetensors_header(path)`: the 8-byte header length, the JSON header, and the file's
  size against the tensors' declared offsets (so a truncated file is caught from its header);
- `tensor_index(folder)`: every tensor of a folder (one file or a sharded index) with its
  file, dtype and shape;
- `check_tokenizer_files(folder)`: a tokenizer file is there, and the JSON ones parse.

What the tensors must be for a given model (names, shapes, dtypes) is the model's business:
`im_jax.models.llama.params.check_hf_tensors`, from its one HF name table.
Standalone (no im_jax imports), like `hub`: models, data and entry points all use it.
"""

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Any

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a tokenizer loads from: the fast tokenizer's file, a sentencepiece model, a vocabulary.
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# safetensors dtype -> bytes per element (the format's own list).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# config.json's `torch_dtype` / `dtype` -> the safetensors dtype it means.
CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


class ModelFileError(ValueError):
  """A missing, cut or unparsable model file; the message is one line, `FILE: what is wrong`."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path, self.problem = str(path), problem
    super().__init__(f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  dtype: str  # safetensors' name: F32, BF16, ...
  shape: tuple[int, ...]


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in `path`; ModelFileError when it is missing, cut short or not an object."""
  path = pathlib.Path(path)
  try:
    text = path.read_bytes().decode("utf-8")
  except FileNotFoundError:
    raise ModelFileError(path, "no such file") from None
  except UnicodeDecodeError as e:
    raise ModelFileError(path, f"not UTF-8 text (byte {e.start})") from None
  if not text.strip():
    raise ModelFileError(path, "empty file (an interrupted download or copy?)")
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    cut = " (the file looks cut short)" if e.pos >= len(text.rstrip()) else ""
    raise ModelFileError(path, f"invalid JSON at line {e.lineno} column {e.colno}: "
                         f"{e.msg}{cut}") from None
  if not isinstance(value, dict):
    raise ModelFileError(path, f"expected a JSON object, got {type(value).__name__}")
  return value


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Every tensor a `.safetensors` file declares, after checking the file holds them all.

  Layout: an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
  data_offsets: [begin, end]}} relative to the data that follows), then the data, which the
  tensors must cover exactly. Reads the header only.
  """
  path = pathlib.Path(path)
  try:
    size = path.stat().st_size
    with path.open("rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
      raw = f.read(n) if n is not None and n <= min(size - 8, _MAX_HEADER_BYTES) else None
  except FileNotFoundError:
    raise ModelFileError(path, "no such file") from None
  if n is None:
    raise ModelFileError(path, f"{size} bytes: too short to be a safetensors file (cut short?)")
  if n > _MAX_HEADER_BYTES:
    raise ModelFileError(path, f"not a safetensors file (its first 8 bytes give a header of {n} "
                         "bytes)")
  if raw is None:
    raise ModelFileError(path, f"cut short: the header needs {n} bytes, the file holds "
                         f"{size - 8} after its length (an interrupted download or copy?)")
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModelFileError(path, f"unparsable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise ModelFileError(path, "unparsable safetensors header (not a JSON object)")
  tensors = {name: _tensor_entry(path, name, entry) for name, entry in header.items()
             if name != "__metadata__"}
  end = 0  # the tensors lie back to back from the start of the data, in offset order
  for begin, stop, name in sorted((e["data_offsets"][0], e["data_offsets"][1], k)
                                  for k, e in header.items() if k in tensors):
    if begin != end:
      raise ModelFileError(path, f"damaged header: tensor {name} starts at byte {begin} of the "
                           f"data, not {end}")
    end = stop
  data = size - 8 - n
  if end > data:
    raise ModelFileError(path, f"cut short: its tensors need {end} bytes of data, the file "
                         f"holds {data} (an interrupted download or copy?)")
  if end < data:
    raise ModelFileError(path, f"damaged: {data - end} bytes past the last tensor its header "
                         "declares")
  return tensors


def _tensor_entry(path: pathlib.Path, name: str, entry: Any) -> TensorInfo:
  bad = ModelFileError(path, f"unparsable safetensors header: tensor {name}: {entry!r:.80}")
  if not isinstance(entry, dict):
    raise bad
  dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
  if (dtype not in DTYPE_BYTES or not isinstance(shape, list)
      or not all(isinstance(d, int) and d >= 0 for d in shape)
      or not isinstance(offsets, list) or len(offsets) != 2
      or not all(isinstance(o, int) and o >= 0 for o in offsets)):
    raise bad
  if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
    raise ModelFileError(path, f"damaged header: tensor {name} ({dtype} {shape}) spans "
                         f"{offsets[1] - offsets[0]} bytes")
  return TensorInfo(path, dtype, tuple(shape))


def tensor_index(folder: str | os.PathLike) -> dict[str, TensorInfo]:
  """name -> TensorInfo for a folder's `model.safetensors` or sharded index, every file checked."""
  folder = pathlib.Path(folder)
  index = folder / INDEX_FILE
  if index.exists():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                   for f in weight_map.values()):
      raise ModelFileError(index, "no `weight_map` object of tensor name -> file")
    shards = {}
    for shard in sorted(set(weight_map.values())):
      if not (folder / shard).is_file():
        raise ModelFileError(folder / shard, f"no such file ({INDEX_FILE} names it)")
      shards[shard] = read_safetensors_header(folder / shard)
    out = {}
    for name, shard in weight_map.items():
      if name not in shards[shard]:
        raise ModelFileError(folder / shard, f"lacks tensor {name}, which {INDEX_FILE} places "
                             "there")
      out[name] = shards[shard][name]
    return out
  if (folder / SINGLE_FILE).exists():
    return read_safetensors_header(folder / SINGLE_FILE)
  raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (no model weights here)")


def check_tokenizer_files(folder: str | os.PathLike, required: bool = True) -> None:
  """The tokenizer JSON files present in `folder` parse, and (when `required`) the folder
  has a file a tokenizer loads from. Which ones a tokenizer needs is the tokenizer
  library's business; a missing or damaged one is ours to name."""
  if required and not any((pathlib.Path(folder) / name).is_file()
                          for name in TOKENIZER_MODEL_FILES):
    raise ModelFileError(folder, f"no tokenizer file ({', '.join(TOKENIZER_MODEL_FILES[:-1])} "
                         f"or {TOKENIZER_MODEL_FILES[-1]}): an incomplete download or copy?")
  for name in TOKENIZER_JSON_FILES:
    if (pathlib.Path(folder) / name).exists():
      read_json(pathlib.Path(folder) / name)
