"""Stage `quantize`: the command line of `pgolf_core.stage.quantize.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, quantize


def main(argv: list[str] | None = None) -> None:
    cli.main("quantize", quantize.run, quantize.QuantizePaths, argv)


if __name__ == "__main__":
    main()
