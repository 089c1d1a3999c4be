"""Minitron pruning (the `prune` mode): importance from one calibration pass, explicit sizes or a
parameter budget, in-place surgery at any TP/PP, the plan replayed from checkpoints."""
