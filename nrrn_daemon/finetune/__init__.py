"""Nightly fine-tuning: the schedule, the child run, training, validation, the promotion gate."""
