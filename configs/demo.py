"""The README's main job: a short IM fine-tune on data the project generates itself.

A tiny Llama and a BPE tokenizer trained on the synthetic data, on the CPU, in about two
minutes: the output loss falls on train and is reported on the held-out split, and the run
ends with a Hugging Face export that transformers loads.
"""

from im_jax.configs import base


def get_config():
  c = base.get_config()
  c.model.preset = "tiny"
  c.data.train = "synthetic:3000"
  c.data.tokenizer = "synthetic"
  c.data.max_seq_len = 256
  c.data.eval_fraction = 0.05
  c.loss.mode = "im"
  c.optim.lr = 3e-3
  c.optim.warmup_ratio = 0.05
  c.optim.decay = "cosine"
  c.train.batch_size = 16
  c.train.max_steps = 400
  c.train.log_every = 10
  c.eval.every_steps = 200
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 200
  c.export_hf = True
  return c
