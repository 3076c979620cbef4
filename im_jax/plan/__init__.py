"""Launch plans: a run's train step compiled for a TPU topology (or N CPUs), measured."""
