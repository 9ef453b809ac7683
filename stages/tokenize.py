"""Stage `tokenize`: the command line of `pgolf_core.stage.tokenize.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, tokenize


def main(argv: list[str] | None = None) -> None:
    cli.main("tokenize", tokenize.run, tokenize.TokenizePaths, argv)


if __name__ == "__main__":
    main()
