"""Stage `verify`: the command line of `pgolf_core.stage.verify.run` (see `pgolf_core.stage.cli`)."""

from pgolf_core.stage import cli, verify


def main(argv: list[str] | None = None) -> None:
    cli.main("verify", verify.run, verify.VerifyPaths, argv)


if __name__ == "__main__":
    main()
