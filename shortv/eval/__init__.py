"""Evaluation: LLaVA-format question files and answer files, VQA scoring, the lmms-eval
model, and data-parallel runs over torchrun."""
