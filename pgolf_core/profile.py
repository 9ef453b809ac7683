"""Apply a profile: `python -m pgolf_core.profile profiles/record_8xh100.yaml`.

DVC has no notion of profiles, so a profile is a file of overrides and applying it
rewrites params.yaml in full (defaults + overrides): DVC then tracks every key and
`dvc exp run -S` applies on top as usual.
"""

import argparse

from pgolf_core.config import apply_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a YAML file of overrides, e.g. profiles/record_8xh100.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file to rewrite")
    args = parser.parse_args()
    configs = apply_profile(args.profile, args.params)
    train = configs["train"]
    print(f"{args.params} <- {args.profile}: {train.model.num_layers} layers x {train.model.model_dim}, "
          f"vocab {configs['tokenize'].vocab_size}, {train.batch_tokens:,} tokens/step, schedule {train.schedule.mode}")


if __name__ == "__main__":
    main()
