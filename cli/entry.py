"""The ``geocache`` console script. A Ctrl-C while the command line loads (torch and transformers
take seconds to import, before click or the command's own handler runs) ends with one line and
exit 130, like one during the command, not with a traceback of the import machinery."""

import sys


def main() -> None:
    try:
        from geocache_cli.main import main as command_line
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting: nothing was done\n")
        sys.exit(130)
    command_line()
