"""Stage `train`: the command line of `pgolf_core.stage.train.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, train


def main(argv: list[str] | None = None) -> None:
    cli.main("train", train.run, train.TrainPaths, argv)


if __name__ == "__main__":
    main()
