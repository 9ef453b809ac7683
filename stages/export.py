"""Stage `export`: the command line of `pgolf_core.stage.export.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, export


def main(argv: list[str] | None = None) -> None:
    cli.main("export", export.run, export.ExportPaths, argv)


if __name__ == "__main__":
    main()
