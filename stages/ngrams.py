"""Stage `ngrams`: the command line of `pgolf_core.stage.ngrams.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, ngrams


def main(argv: list[str] | None = None) -> None:
    cli.main("ngrams", ngrams.run, ngrams.NgramsPaths, argv)


if __name__ == "__main__":
    main()
