"""Parity with transformers (PyTorch, CPU, float32) and the HF <-> im_jax parameter table."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from im_jax.models.llama import LlamaConfig
from im_jax.models.llama import params

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
# Each supported shape as transformers configures it.
HF_CASES = {
    "llama2_mha": lambda: transformers.LlamaConfig(**_TINY, num_key_value_heads=4),
    "llama3_gqa_scaled": lambda: transformers.LlamaConfig(
        **_TINY, num_key_value_heads=2, rope_theta=500000.0,
        # A short original context so all three llama3 frequency bands occur at head_dim 16.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_attention_bias_mqa": lambda: transformers.LlamaConfig(
        **_TINY, num_key_value_heads=1, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_TINY, num_key_value_heads=2),
    "qwen2_biases": lambda: transformers.Qwen2Config(**_TINY, num_key_value_heads=2),
    "tied_smollm2_like": lambda: transformers.LlamaConfig(
        **_TINY, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
}


def _save_tiny_hf(case: str, out) -> transformers.PreTrainedModel:
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(HF_CASES[case]()).float().eval()
  with torch.no_grad():  # HF zero-inits biases and one-inits norms: randomise everything
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(out)
  return model


forward = nnx.jit(lambda model, *args: model(*args))


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_case(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param)
  return out, _save_tiny_hf(request.param, out)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tiny_logits_and_bit_exact_round_trip(hf_case, scan_layers):
  hf_dir, torch_model = hf_case
  config = LlamaConfig.from_hf(hf_dir, scan_layers=scan_layers)
  model = params.load_hf(hf_dir, config)
  tokens = np.random.RandomState(0).randint(0, 256, (2, 24))
  diff = np.abs(np.asarray(forward(model, tokens)) - _torch_logits(torch_model, tokens)).max()
  assert diff <= 1e-4, diff

  original = load_file(hf_dir / "model.safetensors")
  exported = params.to_hf(model, config)
  assert sorted(exported) == sorted(original) == sorted(params.hf_tensor_names(config))
  for name, x in original.items():
    assert exported[name].dtype == x.dtype and np.array_equal(exported[name], x), name
  # A plain nested dict (e.g. restored from a checkpoint) exports the same.
  from_dict = params.to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
  assert all(np.array_equal(from_dict[n], x) for n, x in exported.items())


def test_export_loads_in_transformers_sharded(hf_case, tmp_path):
  hf_dir, torch_model = hf_case
  config = LlamaConfig.from_hf(hf_dir, scan_layers=True)
  model = params.load_hf(hf_dir, config)
  files = params.save_hf_safetensors(tmp_path, model, config, max_shard_bytes=100_000)
  assert len(files) > 1 and (tmp_path / params.INDEX_FILE).exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
  assert type(reloaded) is type(torch_model)
  ref, got = torch_model.state_dict(), reloaded.state_dict()
  for name, x in ref.items():
    assert torch.equal(got[name], x), name
  # And back in through the sharded index.
  again = params.load_hf(tmp_path, LlamaConfig.from_hf(tmp_path, scan_layers=True))
  tokens = np.arange(10)[None]
  np.testing.assert_array_equal(forward(again, tokens), forward(model, tokens))


def test_load_into_shardings(tmp_path):
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
  rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
           "vocab": "tensor"}

  def sharding(axes, shape):
    return NamedSharding(mesh, PartitionSpec(*(rules.get(a) for a in axes)))

  torch_model = _save_tiny_hf("llama3_gqa_scaled", tmp_path)
  config = LlamaConfig.from_hf(tmp_path, scan_layers=True)
  model = params.load_hf(tmp_path, config, shardings=sharding)
  q = model.layers.attn.q_proj.kernel[...]
  assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  # A pytree of shardings (as the trainer builds) works too.
  tree = jax.tree.map(lambda v: sharding(v.get_metadata()["logical_axes"], v.shape),
                      nnx.state(params.abstract_model(config), nnx.Param),
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  same = params.load_hf(tmp_path, config, shardings=tree)
  tokens = np.arange(12)[None]
  ref = _torch_logits(torch_model, tokens)
  for m in (model, same):
    assert np.abs(np.asarray(forward(m, tokens)) - ref).max() <= 1e-4


def test_load_errors_name_the_tensor(tmp_path):
  _save_tiny_hf("llama2_mha", tmp_path)
  config = LlamaConfig.from_hf(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")

  def rewrite(d):
    save_file(d, tmp_path / "model.safetensors", metadata={"format": "pt"})

  name = "model.layers.1.mlp.up_proj.weight"
  rewrite({k: v for k, v in tensors.items() if k != name})
  with pytest.raises(ValueError, match="missing.*" + name.replace(".", r"\.")):
    params.load_hf(tmp_path, config)
  rewrite({**tensors, "model.layers.2.mlp.up_proj.weight": tensors[name]})
  with pytest.raises(ValueError, match=r"unknown.*model\.layers\.2\.mlp\.up_proj"):
    params.load_hf(tmp_path, config)
  rewrite({**tensors, name: tensors[name][:, :-1]})
  with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*shape"):
    params.load_hf(tmp_path, config)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError):
    params.load_hf(tmp_path, config)


def test_legacy_config_file_loads(hf_case, tmp_path):
  """A config.json written before transformers 5 (rope_theta/rope_scaling at top level)."""
  hf_dir, _ = hf_case
  d = json.loads((hf_dir / "config.json").read_text())
  rope = d.pop("rope_parameters")
  d["rope_theta"] = rope.pop("rope_theta")
  if rope.get("rope_type") != "default":
    d["rope_scaling"] = rope
  assert LlamaConfig.from_hf(d) == LlamaConfig.from_hf(hf_dir)


# A real pretrained model.

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
]


def test_smollm2_logits_match_transformers(smollm2_hf_dir):
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
  texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
           for p in PROMPTS]
  rows = [tok(t, add_special_tokens=False)["input_ids"][:32] for t in texts]
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_hf_dir, dtype=torch.float32).eval()
  config = LlamaConfig.from_hf(smollm2_hf_dir, scan_layers=True)
  assert config == LlamaConfig.preset("smollm2_135m", scan_layers=True,
                                      rms_norm_eps=config.rms_norm_eps)
  model = params.load_hf(smollm2_hf_dir, config)
  # All prompts packed into one row: each segment must match transformers run on it alone.
  tokens = np.concatenate([np.asarray(r) for r in rows])[None]
  positions = np.concatenate([np.arange(len(r)) for r in rows])[None]
  segments = np.concatenate([np.full(len(r), i + 1) for i, r in enumerate(rows)])[None]
  packed = np.asarray(forward(model, tokens, positions, segments))
  start, worst = 0, 0.0
  for r in rows:
    ref = _torch_logits(torch_model, np.asarray([r]))
    worst = max(worst, np.abs(packed[:, start:start + len(r)] - ref).max())
    start += len(r)
  assert worst <= 1e-3, worst
