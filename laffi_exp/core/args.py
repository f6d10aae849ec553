"""The command lines' argument parser: a bad command line is one line and exit code 2."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other command-line error here
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)
