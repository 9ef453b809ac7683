"""The benchmark contract of ../shared/DESIGN.md: each module is run as
`python -m bench.<name>` from the repository root, prints one JSON line and writes
`bench/results/<name>.json`, headed by `bench.header.header`."""
