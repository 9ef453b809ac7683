"""The six DVC stages as library functions, one shape for all: each module holds a frozen
`<Stage>Paths` dataclass (its input and output paths, one field per CLI flag of
`dvc.yaml`'s cmd) and `run(cfg, paths) -> StageResult` (`result.py`), which does the
stage's work, writes its artifacts and returns its metrics. `cli.main` is the whole
command line of every `stages/<name>.py`; `validation.load_validation` is the setup
(tokenizer, validation split, byte counts) the stages that score text share."""
