"""``geocache`` command line: parses options and calls the library; no logic of its own."""

from __future__ import annotations

import click

import geocache


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(geocache.__version__, "--version", "-V", prog_name="geocache")
def main() -> None:
    """geocache: cache a base model's next-token statistics once, then fine-tune against them.

    geometry-aware DoRA fine-tuning that keeps the tuned model close to its base where it matters:
    per-position KL to the base, entropy drop, calibration gap and MoE router drift.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
