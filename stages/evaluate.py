"""Stage `evaluate`: the command line of `pgolf_core.stage.evaluate.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, evaluate


def main(argv: list[str] | None = None) -> None:
    cli.main("evaluate", evaluate.run, evaluate.EvaluatePaths, argv)


if __name__ == "__main__":
    main()
