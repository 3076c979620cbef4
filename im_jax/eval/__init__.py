"""Evaluation: held-out loss on output tokens and batched generation with a KV cache.

- `loss_eval`: `make_eval_loss_fn` / `finalize` (shared with training's periodic eval) and
  `evaluate_loss(model, tokenizer, conversations, LossEvalConfig(...))`.
- `generate`: `Generator` (prefill + `lax.while_loop` decode under one jit) and
  `generate_records(...)` in AlpacaEval's format.
- `python -m im_jax.eval loss|generate`: the command line.
"""
