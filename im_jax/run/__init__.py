"""The program's wiring, the top of the house: from config files to a running experiment.

`settings` (a config -> the one typed `RunConfig`, validated), `experiment` (data, model,
sharded state, loop, export), `run_data` (a run's data: sources, tokenizer, cached
plan, pipelines), `dry_run` (the data plan without the run), `train` (the train command's body;
`python -m im_jax.train` runs it), `config_args` (`--config FILE` and `--config.KEY=VALUE`)
and `wandb_log` (W&B, a metrics sink handed to the loop). Modules here import the libraries
below (data, models, train, checkpoint, convert, eval); nothing below imports them.
"""
