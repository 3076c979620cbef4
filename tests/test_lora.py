"""LoRA: zero adapters change nothing, training moves only adapters (sharded == one device),
and both exports (merged HF folder, PEFT adapter folder) match im_jax's logits in
transformers / peft on the real SmolLM2."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from im_jax.configs import base as configs_base
from im_jax.run import experiment, settings
from im_jax.convert import hf_export, peft_export
from im_jax.models import lora
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.models.llama import params as hf_params
from im_jax.train import loop, optim, sharding, step
from im_jax.train import loss as loss_lib
from tests import fixtures_lib, train_rows

# The training/eval commands this module starts share compiled steps (tests/conftest.py).
# slow: the real SmolLM2, training subprocesses
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compilation_cache")]

ROOT = pathlib.Path(__file__).resolve().parents[1]

LENGTH = 32
TINY = LlamaConfig.preset("tiny", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8,
                          scan_layers=True)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _rows(seed, rows=8):
  examples = train_rows.make_examples(seed, 2 * rows, TINY.vocab_size, 5, 14)
  return train_rows.pack(examples, rows, LENGTH)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


@nnx.jit
def _base_logits(model, tokens):  # `disabled` acts at trace time: inside the jitted function
  with lora.disabled():
    return model(tokens)


def _with_random_b(model: nnx.Module, seed: int = 1, scale: float = 0.05) -> nnx.Module:
  for i, (_, (_, b)) in enumerate(sorted(lora.adapters(model).items())):
    b.set_value(scale * jax.random.normal(jax.random.PRNGKey(seed + i), b.shape, b.dtype))
  return model


def test_resume_check_covers_the_lora_keys_only_when_on():
  c = configs_base.get_config()
  # full fine-tuning keys unchanged
  assert "lora" not in experiment.resume_key(settings.load(c))["model"]
  c.model.init_from, c.model.lora.rank = "hf:/models/base", 8
  saved = {loop.RESUME_KEY: experiment.resume_key(settings.load(c))}
  c.model.lora.targets, c.model.init_from = "q,v", "hf:/models/other"
  changed = loop.resume_mismatch(saved, {loop.RESUME_KEY: experiment.resume_key(settings.load(c))})
  assert changed == ["model.init_from: 'hf:/models/base' -> 'hf:/models/other'",
                     "model.lora.targets: 'q,k,v,o,gate,up,down' -> 'q,v'"], changed


def test_zero_b_leaves_logits_identical_and_disabled_is_the_base():
  base_config = TINY
  base = Llama(base_config, rngs=nnx.Rngs(0))
  model = Llama(base_config.replace(lora=LORA), rngs=nnx.Rngs(1))
  nnx.update(model, nnx.state(base, nnx.Param))
  tokens = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 16))
  want = np.asarray(_logits(base, tokens))
  np.testing.assert_array_equal(np.asarray(_logits(model, tokens)), want)  # B = 0: the base
  _with_random_b(model)
  assert np.abs(np.asarray(_logits(model, tokens)) - want).max() > 1e-3  # adapters now act
  # The KL reference hook: the same weights with the adapters off.
  np.testing.assert_array_equal(np.asarray(_base_logits(model, tokens)), want)


@pytest.mark.parametrize("kl_type", ["full", "target_token"])
def test_kl_reference_is_the_base_under_the_adapters(kl_type):
  """LoRA + KL: the reference is the model with adapters off, equal to a separate base model."""
  base = Llama(TINY, rngs=nnx.Rngs(0))
  model = Llama(TINY.replace(lora=LORA), rngs=nnx.Rngs(1))
  nnx.update(model, nnx.state(base, nnx.Param))
  batch = {k: jnp.asarray(v) for k, v in _rows(0, rows=2).items()}
  loss_fn = step.make_loss_fn(loss_lib.LossConfig("token", chunk_size=8, kl_to_base=0.5,
                                                  kl_type=kl_type))
  own = nnx.jit(lambda m, b: loss_fn(m, b, None))
  separate = nnx.jit(lambda m, r, b: loss_fn(m, b, None, reference=r))
  assert float(own(model, batch)[loss_lib.KL_NUMERATOR]) == 0.0  # B = 0: the model is its base
  _with_random_b(model)
  got, want = own(model, batch), separate(model, base, batch)
  assert float(got[loss_lib.KL_NUMERATOR]) != 0.0
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6,
                               atol=1e-6, err_msg=key)
  c = configs_base.get_config()  # and the train state holds no copy of the base
  c.model.lora.rank, c.loss.kl_to_base = 4, 0.5
  c.model.init_from = "hf:/models/base"  # a valid config (never read: TINY is the model)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  steps = experiment.build_steps(settings.load(c), TINY.replace(lora=LORA), mesh, 10)
  assert steps.shardings.reference is None and steps.shardings.frozen is not None


def test_merged_kernels_give_the_adapted_logits():
  unscanned = TINY.replace(scan_layers=False)  # the other layout (the rest use scanned layers)
  model = _with_random_b(Llama(unscanned.replace(lora=LORA), rngs=nnx.Rngs(0)))
  plain = Llama(unscanned, rngs=nnx.Rngs(2))
  nnx.update(plain, lora.merged_state(model, LORA.scale))
  tokens = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 16))
  np.testing.assert_allclose(np.asarray(_logits(plain, tokens)), np.asarray(_logits(model, tokens)),
                             rtol=1e-5, atol=1e-5)


def _train(mesh_shape, config, steps=3):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)[0]
  graphdef, state, shardings = step.create_train_state(
      lambda: Llama(config, rngs=nnx.Rngs(0)), tx, mesh)
  initial = tuple(dict(nnx.to_flat_state(jax.device_get(x))) for x in (state.params, state.frozen))
  train_step = step.make_train_step(graphdef, tx, shardings, mesh, step.make_loss_fn(),
                                    donate=False)
  losses = []
  for i in range(steps):
    state, metrics = train_step(state, sharding.global_batch(_rows(i), mesh, micro_batches=1))
    losses.append(float(metrics["loss"]))
  return initial, state, losses


@pytest.fixture(scope="module")
def one_device_run():
  # bf16 base weights: adapters and their moments stay float32.
  return _train((1, 1, 1), TINY.replace(lora=LORA, param_dtype="bfloat16"))


def test_steps_change_only_adapters_in_float32(one_device_run):
  (params0, frozen0), state, losses = one_device_run
  assert all(np.isfinite(losses))
  adapter_paths = {p for p, _ in nnx.to_flat_state(state.params)}
  assert adapter_paths and all(p[-2] == "lora" for p in adapter_paths)
  for path, v in nnx.to_flat_state(state.frozen):  # the base: bit-identical, still bf16
    assert v[...].dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(frozen0[path][...]),
                                  err_msg=str(path))
  b_moved = [not np.array_equal(np.asarray(v[...]), np.asarray(params0[p][...]))
             for p, v in nnx.to_flat_state(state.params) if p[-1] == "b"]
  assert all(b_moved)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert moments and all(x.dtype == jnp.float32 for x in moments)
  # Moments exist for the adapters only: two per adapter factor (AdamW's mu and nu).
  assert sum(x.size for x in moments) == 2 * sum(v[...].size for _, v in
                                                 nnx.to_flat_state(state.params))


def test_lora_on_2x2x2_mesh_equals_one_device(one_device_run):
  _, want, want_losses = one_device_run
  _, got, got_losses = _train((2, 2, 2), TINY.replace(lora=LORA, param_dtype="bfloat16"))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for (path, g), (_, w) in zip(nnx.to_flat_state(got.params), nnx.to_flat_state(want.params)):
    assert g[...].sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w[...]), rtol=1e-4, atol=2e-5,
                               err_msg=str(path))


def test_adapters_are_sharded_along_their_kernels_axes():
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 4, 2))
  abstract = nnx.eval_shape(lambda: Llama(TINY.replace(lora=LORA), rngs=nnx.Rngs(0)))
  _, adapters, _ = nnx.split(abstract, nnx.LoRAParam, ...)
  specs = {p: tuple(s.spec) for p, s in nnx.to_flat_state(sharding.state_shardings(adapters, mesh))}
  assert specs[("layers", "attn", "q_proj", "lora", "a")] == (None, "fsdp", None)
  assert specs[("layers", "attn", "q_proj", "lora", "b")] == (None, None, "tensor", None)
  assert specs[("layers", "attn", "o_proj", "lora", "a")] == (None, "tensor", None, None)
  assert specs[("layers", "mlp", "down_proj", "lora", "b")] == (None, None, "fsdp")


def test_smollm2_peft_folder_and_merged_export_match_im_jax(smollm2_hf_dir, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers  # pylint: disable=g-import-not-at-top

  base_config = LlamaConfig.from_hf(smollm2_hf_dir, scan_layers=True)
  config = base_config.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))
  base = hf_params.load_hf(smollm2_hf_dir, base_config)
  model = Llama(config, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(base, nnx.Param))
  del base
  _with_random_b(model, scale=0.02)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 24))
  want = np.asarray(_logits(model, tokens))

  peft_dir = peft_export.save_peft_adapter(tmp_path / "adapter", model, config,
                                           str(smollm2_hf_dir))
  assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 4
  merged_dir = hf_export.export_hf(tmp_path / "merged", lora.merged_state(model, 2.0),
                                   config.replace(lora=lora.LoraConfig()), smollm2_hf_dir,
                                   template="hf")
  del model

  def logits(hf_model):
    with torch.no_grad():
      return hf_model(torch.tensor(tokens)).logits.float().numpy()

  def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()

  def rel(x):
    return np.abs(x - want).max() / np.abs(want).max()

  with_adapter = peft.PeftModel.from_pretrained(load(smollm2_hf_dir), peft_dir).eval()
  got_peft = logits(with_adapter)
  assert rel(got_peft) <= 1e-4, rel(got_peft)
  with with_adapter.disable_adapter():  # the adapters matter: without them it is different
    assert rel(logits(with_adapter)) > 1e-3
  del with_adapter
  got_merged = logits(load(merged_dir))
  assert rel(got_merged) <= 1e-4, rel(got_merged)


def test_lora_run_exports_merged_and_peft_and_names_a_missing_base(tmp_path, tiny_tokenizer_dir,
                                                                   capsys):
  """A LoRA training run end to end: its checkpoint resolves the base it recorded; to-hf's
  merged folder (and the run's own export_hf) and the PEFT folder loaded by peft onto the
  base give im_jax's logits; a moved base is one line naming it, and --base finds it."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers  # pylint: disable=g-import-not-at-top

  from im_jax.convert import load  # pylint: disable=g-import-not-at-top
  from im_jax.convert.__main__ import main as convert  # pylint: disable=g-import-not-at-top

  base = fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, tmp_path / "base")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/base.py"),
       "--workdir", str(workdir), "--config.data.train=synthetic:64",
       f"--config.model.init_from=hf:{base}", "--config.model.lora.rank=4",
       "--config.model.lora.targets=q,o,down", "--config.data.max_seq_len=64",
       "--config.train.batch_size=8", "--config.train.max_steps=3", "--config.optim.lr=1e-2",
       "--config.optim.warmup_ratio=0", "--config.data.read_threads=0",
       "--config.mesh.data=2", "--config.mesh.fsdp=4",
       "--config.export_hf=true"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  loaded = load.load_pretrained(workdir)
  assert loaded.config.lora.targets == ("q", "o", "down")
  assert loaded.info[load.LORA_BASE] == f"hf:{base}"
  tokens = np.random.RandomState(0).randint(0, 400, (2, 20))
  want = np.asarray(_logits(loaded.model, tokens))
  with_base = np.asarray(_base_logits(loaded.model, tokens))
  assert np.abs(want - with_base).max() > 1e-4, "training did not move the adapters"

  assert convert(["to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "merged")]) == 0
  assert convert(["to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "adapter"),
                  "--adapter"]) == 0
  assert "base hf:" in capsys.readouterr().out

  def logits(path, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
      model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
      return model.eval()(torch.tensor(tokens)).logits.numpy()

  scale = np.abs(want).max()
  for got in (logits(tmp_path / "merged"), logits(workdir / "hf"),
              logits(base, tmp_path / "adapter")):
    assert np.abs(got - want).max() / scale <= 1e-4
  np.testing.assert_allclose(logits(base), with_base, rtol=1e-4, atol=1e-4 * scale)

  moved = base.rename(tmp_path / "moved")
  capsys.readouterr()  # drop transformers' progress bars
  assert convert(["to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(base) in err and "--base" in err, err
  assert not (tmp_path / "x").exists()
  assert convert(["to-hf", "--ckpt", str(workdir), "--out", str(tmp_path / "x"),
                  "--base", f"hf:{moved}", "--tokenizer", str(moved)]) == 0, capsys.readouterr().err
