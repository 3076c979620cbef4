"""Evaluation: held-out loss on output tokens and batched generation with a KV cache.

- `loss_eval`: `make_eval_loss_fn` / `finalize` (shared with training's periodic eval) and
  `evaluate_loss(model, tokenizer, conversations, LossEvalConfig(...))`.
- `generate`: `Generator` (prefill + `lax.while_loop` decode under one jit) and
  `generate_records(...)` in AlpacaEval's format.
- `harness_lm`: `HarnessLM`, lm-evaluation-harness's model interface on the sharded model;
  `harness`: task checks, runs and `harness/TASK/METRIC` metrics (also training's hook);
  `harness_paper`: the paper's task group; `harness_cli`: `python -m im_jax.eval harness`.
- `python -m im_jax.eval loss|generate|harness`: the command line.
"""
