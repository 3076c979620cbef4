"""The program's wiring, the top of the house: from config files to a running experiment.

`settings` (a config -> every layer's typed config), `experiment` (data, model, sharded state,
loop, export), `dry_run` (the data plan without the run) and the train entry point. Modules here
import the libraries below (data, models, train, checkpoint, convert, eval); nothing below
imports them.
"""
