"""Every key an im_jax training run reads, with the paper's defaults (docs/configuration.md).

Other config files start from `get_config()` here and change what they need, so every key
exists in every config and any of them can be overridden on the command line:
`--config.loss.mode=it`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # tiny | smollm2_135m | llama2_7b | llama2_13b | llama3_8b | ...
  # "" (random init) | hf:DIR | hf:ORG/NAME (Hub cache) | a CKPT folder | a training workdir
  c.model.init_from = ""
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # none | minimal | full
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"  # bfloat16 on accelerators
  # auto: splash on TPU, blocked on CPU for rows >= 256, else xla | xla (runs everywhere) |
  # splash (Pallas TPU kernel; off TPU interpreted, slow) | cudnn (fused, NVIDIA GPUs,
  # unverified) | blocked (plain XLA, skips blocks of the packed rows' masked scores; long
  # packed rows on CPU/GPU)
  c.model.attention_impl = "auto"
  # LoRA (docs/lora.md): rank 0 = full fine-tuning; > 0 trains only adapters of this rank on
  # the frozen model.init_from weights (W + alpha/rank * B A).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "q,k,v,o,gate,up,down"  # any of q, k, v, o, gate, up, down
  c.model.lora.dropout = 0.0  # on the adapters' input, training only

  c.data = ml_collections.ConfigDict()
  # a file (JSON(L) or parquet), hf:ORG/NAME[:SPLIT] (a Hub dataset), tfds:NAME:SPLIT, synthetic:N
  c.data.train = ""
  c.data.format = ""  # "" = detect | tulu | alpaca | sharegpt | prompt_completion
  c.data.tokenizer = ""  # "" = the init_from model's | a folder | hf:ORG/NAME | synthetic
  c.data.template = "tulu"  # tulu (the paper's) | hf (the tokenizer's chat template)
  c.data.max_seq_len = 2048
  c.data.truncation = "right"  # right (the paper's) | drop
  # unset: tulu strips each message's content (the paper's release), hf renders content as the
  # tokenizer's template does | false: tulu keeps content whitespace
  c.data.strip_content = ml_collections.config_dict.placeholder(bool)
  # "" = by loss mode: no_weight under im_release (the release's rule), else no_output (IT and
  # IM keep the same examples) | no_output | no_weight
  c.data.drop_rule = ""
  c.data.packing = "first_fit"  # first_fit | best_fit | none (one example per row)
  c.data.max_segments_per_row = 64
  c.data.eval_fraction = 0.0  # held out by a hash of each example's id
  c.data.max_examples = 0  # >0: only the first N examples of data.train (quick tests)
  c.data.on_bad_record = "error"  # error | skip (skipped records are counted and reported)
  c.data.read_threads = 2

  c.loss = ml_collections.ConfigDict()
  c.loss.mode = "im"  # it | im | im_release
  c.loss.instruction_weight = 1.0  # im only
  c.loss.normalization = "sequence"  # sequence (the paper's per-example mean) | token
  c.loss.assistant_turns = "all"  # all | last
  c.loss.chunk_size = 0  # >0: chunked cross-entropy over this many positions
  # beta of the KL to the starting model, added to each labelled token's CE (0 = off). The
  # reference costs one more parameter copy and a forward pass (~+33% FLOPs) per step.
  c.loss.kl_to_base = 0.0
  c.loss.kl_type = "full"  # full (KL over the vocabulary) | target_token (log p - log p_base)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.03
  c.optim.decay = "linear"  # linear | cosine | constant
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.max_grad_norm = 1.0  # <= 0: no clipping

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global rows per optimizer step
  c.train.max_steps = 0  # 0 = derived from train.epochs
  c.train.epochs = 2
  c.train.seed = 0
  c.train.grad_accum = 1  # micro-batches per optimizer step
  c.train.log_every = 1
  c.train.max_consecutive_skips = 10  # updates skipped in a row (non-finite grads) -> stop

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 takes the remaining devices
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = only at the end
  c.eval.batch_size = 8  # global rows per eval batch
  # lm-evaluation-harness tasks scored during training (docs/harness.md): comma-separated
  # lm-eval names or `paper`; "" = off. Logged as harness/TASK/METRIC. every_steps 0 = only
  # at the end; limit 0 = every document.
  c.eval.harness_tasks = ""
  c.eval.harness_every_steps = 0
  c.eval.harness_limit = 0
  c.eval.harness_include_path = ""  # a folder of local lm-eval task YAMLs ("" = none)

  # Weights & Biases mirrors metrics.jsonl (process 0; pip install wandb); off when empty
  c.log = ml_collections.ConfigDict()
  c.log.wandb_project = ""
  c.log.wandb_entity = ""  # "" = your default entity
  c.log.wandb_run_name = ""  # "" = the workdir's name
  c.log.wandb_tags = ""  # comma-separated

  c.neftune_alpha = 0.0  # the paper uses 5 for NEFTune runs
  c.export_hf = False  # write a Hugging Face folder to WORKDIR/hf at the end
  return c
