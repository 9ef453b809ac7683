"""Stage `script`: the command line of `pgolf_core.stage.script.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, script


def main(argv: list[str] | None = None) -> None:
    cli.main("script", script.run, script.ScriptPaths, argv)


if __name__ == "__main__":
    main()
