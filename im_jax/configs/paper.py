"""The paper's recipes (docs: ../shared/notes/paper.md) as
`configs/paper.py:DATASET,METHOD,MODEL[,lora]`.

    python -m im_jax.train --config configs/paper.py:lima,im,llama2_7b --workdir runs/lima_im \
        --config.model.init_from=hf:/models/Llama-2-7b-hf

DATASET: lima | dolly3k | alpaca5k (the paper's files in the repository's sibling
  ../shared/data/) or any data spec `data.train` accepts (a path, tfds:NAME:SPLIT, synthetic:N).
METHOD:  it         IT: loss on output tokens only
         im         IM: loss on instruction and output tokens, not on template tokens (Eq. 4)
         neftune    IT + NEFTune noise (alpha 5)
         im_neftune IM + NEFTune noise (alpha 5)
         im_release IM as the authors' code release computes it (loss on most template tokens)
         it_kl      IT + beta * KL(model || base) per labelled token (the paper's KL baseline)
         im_kl      IM + the same KL term
MODEL:   llama2_7b | llama2_13b | smollm2_135m: need pretrained weights, given as an override:
           --config.model.init_from=hf:DIR (or a CKPT folder); the tokenizer comes from there.
         tiny: a random-init 2-layer model with a BPE tokenizer trained on the run's own data
           (WORKDIR/tokenizer), small enough for a CPU: a smoke test of the recipe, not the paper.
lora:    (optional) LoRA instead of full fine-tuning, which the paper used: rank 16, alpha 32,
         dropout 0.05 on q, k, v, o, gate, up, down; lr 10x (2e-4); the frozen base in
         bfloat16 (adapters and their moments stay float32). Needs model.init_from (tiny too).

The paper's hyperparameters: AdamW lr 2e-5 with linear decay and 3% warmup, betas 0.9/0.98,
eps 1e-6, no weight decay, global batch 128, 2 epochs, max length 2048 (right truncation),
bf16 compute, per-example loss averaged over examples (`loss.normalization=sequence`), the
Tulu template. Documented overrides:
  --config.train.epochs=10        the paper's 10-epoch LIMA runs
  --config.data.packing=best_fit  faster: several examples per row. The paper's layout (and
                                  our default here) is one example per row, so a step holds
                                  exactly 128 examples; with packing `train.batch_size` counts
                                  packed rows, so lower it to keep ~128 examples per step
                                  (LIMA at 2048 packs ~3 examples per row: batch_size 40).
  --config.data.eval_fraction=0   train on every example, as the paper did; by default 5% is
                                  held out (the same split for every method) so the output
                                  loss on unseen data can be compared (python -m im_jax.report).

The KL baseline (it_kl, im_kl): the paper gives no beta; the authors' release defaults to
`kl_penalty_ctl` 1.0 with `kl_penalty_type` full, which we take (`loss.kl_to_base=1.0`,
`loss.kl_type=full`). The reference is the starting model (model.init_from), frozen, run in
the same step: one more parameter copy per device and a forward pass, ~+33% FLOPs
(python -m im_jax.plan shows both); with `,lora` no copy: the reference is the model with its
adapters off. `--config.loss.kl_type=target_token` needs beta < 1: its
penalty log p(y) - log p_base(y) turns CE + beta KL into (1 - beta) CE + a constant.
"""

import pathlib

import ml_collections

from im_jax.configs import base

# The paper's data files, shipped next to the repository (not in it: their licences).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATASETS = {
    "lima": "lima.jsonl",
    "dolly3k": "alpagasus_dolly_3k.jsonl",
    "alpaca5k": "alpagasus_alpaca_5k.jsonl",
}
# method -> (loss.mode, neftune_alpha, loss.kl_to_base)
METHODS = {
    "it": ("it", 0.0, 0.0),
    "im": ("im", 0.0, 0.0),
    "neftune": ("it", 5.0, 0.0),
    "im_neftune": ("im", 5.0, 0.0),
    "im_release": ("im_release", 0.0, 0.0),
    # beta: the release's default kl_penalty_ctl (the paper states none)
    "it_kl": ("it", 0.0, 1.0),
    "im_kl": ("im", 0.0, 1.0),
}
MODELS = ("llama2_7b", "llama2_13b", "smollm2_135m", "tiny")
LORA = "lora"
USAGE = ("configs/paper.py:DATASET,METHOD,MODEL[,lora] (e.g. configs/paper.py:lima,im,llama2_7b "
         "or lima,im,llama2_7b,lora)")


def parse_args(args: str | None) -> tuple[str, str, str, bool]:
  """'DATASET,METHOD,MODEL[,lora]' -> (data.train spec, method, model, lora); ValueError
  naming the choices."""
  parts = [p.strip() for p in (args or "").split(",")]
  lora = len(parts) == 4 and parts[3] == LORA
  if lora:
    parts = parts[:3]
  if len(parts) != 3 or not all(parts):
    raise ValueError(f"expected {USAGE}, got {args!r}")
  dataset, method, model = parts
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
  if dataset in DATASETS:
    return str(SHARED_DATA / DATASETS[dataset]), method, model, lora
  # Anything path-like or with a scheme is a data spec; a bare word is most likely a typo.
  if "/" in dataset or "." in dataset or ":" in dataset or pathlib.Path(dataset).exists():
    return dataset, method, model, lora
  raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)} "
                   "or give a data file path")


def get_config(args: str | None = None) -> ml_collections.ConfigDict:
  data, method, model, lora = parse_args(args)
  c = base.get_config()
  c.data.train = data
  c.data.template = "tulu"
  c.data.max_seq_len = 2048
  c.data.truncation = "right"
  c.data.packing = "none"  # the paper's layout: 128 examples per step (see the docstring)
  c.data.eval_fraction = 0.05
  c.loss.mode, c.neftune_alpha, c.loss.kl_to_base = METHODS[method]
  c.loss.kl_type = "full"  # the release's default kl_penalty_type
  # im_release reproduces the release, which keeps any example with a label; the others keep
  # the examples with an output token, so IT and IM train on the same examples.
  c.data.drop_rule = "no_weight" if method == "im_release" else "no_output"
  c.loss.instruction_weight = 1.0
  c.loss.normalization = "sequence"
  c.optim.lr = 2e-5
  c.optim.decay = "linear"
  c.optim.warmup_ratio = 0.03
  c.optim.weight_decay = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
  c.train.batch_size = 128
  c.train.epochs = 2  # LIMA also at 10: --config.train.epochs=10
  c.train.max_steps = 0
  c.eval.every_steps = 1  # runs are short (a few dozen steps at most): every step's point
  c.export_hf = True  # the final model, for standard evaluators

  c.model.preset = model
  c.model.param_dtype = "float32"  # AdamW's master weights
  if model == "tiny":
    # A CPU smoke test: random init learns nothing at 2e-5, and 2048-token rows of 128 are slow.
    c.data.tokenizer = "synthetic"
    c.data.max_seq_len = 512
    c.train.batch_size = 16
    c.optim.lr = 1e-3
    c.model.compute_dtype = "float32"
    c.eval.batch_size = 8
    c.eval.every_steps = 10  # ~110 steps on LIMA; each eval costs more than a tiny step
  else:
    c.data.tokenizer = ""  # from model.init_from
    c.model.compute_dtype = "bfloat16"
    # Memory only (accumulation and chunking are exact): 32 rows per micro-batch split over
    # up to 32 devices, layers recomputed in the backward pass, logits never all at once.
    c.train.grad_accum = 4
    c.model.remat_policy = "full"
    c.loss.chunk_size = 512
    c.eval.batch_size = 32
  if lora:
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout = 16, 32.0, 0.05
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.lr *= 10  # adapters start at B = 0 and are few: LoRA's usual rate is ~10x
    if model != "tiny":
      c.model.param_dtype = "bfloat16"  # the base is frozen: no float32 master weights needed
  return c
