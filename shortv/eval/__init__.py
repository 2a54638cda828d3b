"""Evaluation: answering LLaVA-format question files (read by `shortv.questions`) into
answer files, in one process or data-parallel (`shortv.parallel`); VQA scoring; the
lmms-eval model."""
