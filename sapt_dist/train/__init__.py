"""The continual-learning run: one block's training, evaluation, replay, preemption."""
