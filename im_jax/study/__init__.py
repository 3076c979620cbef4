"""The study that reproduces the paper's findings (`python -m im_jax.study`).

Modules, each resting on the ones before it and on train/eval/report below:
  scales     what each scale (smoke, cpu, accelerator; replicated: the second edition)
             trains and evaluates
  subsets    the fixed held-out sets and the training subsets, written as JSONL
  runs       the list of runs (experiment, dataset subset, method) and their configs
  sizing     the cpu budget rule: subset sizes from a measured tokens/s
  start_models the starting model of a scale (SmolLM2's GGUF turned into a HF folder)
  evaluation per-example held-out losses and memorisation (BLEU, ROUGE-L)
  statistics paired bootstrap intervals, robust readings, across-run intervals, Holm
  results    one JSON file per finished run or evaluation: skipped when present
  runner     trains and evaluates each run, showing progress
  claims     the paper's claims judged from the measured statistics
  writeup    the first edition's results.json, results.md and PNG plots
  second_edition the replicated design's report, with the first edition re-read
  bucket     a gs:// results folder kept in step with the local one
  orchestrate one study from start to report (the entry point's work)
"""
