"""Command-line value types shared by the entry points.

Bad input ends the program with one line on stderr and exit code 2, never a traceback.
"""

import argparse
import atexit
import gc
import re
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, unless the help says it already or there is none (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.help and "(default:" in action.help):
            return action.help
        return super()._get_help_string(action)


class ConfigError(Exception):
    """A bad value in a Flower run config, worded with the run config's keys."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr (exit code 2).

    Parsing a Flower run config (`config_keys` set: flag name -> run-config key), an error raises
    ConfigError in the run config's words instead, for the App to end its run with.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)
        self.config_keys: dict[str, str] | None = None

    def error(self, message: str) -> NoReturn:
        if self.config_keys is not None:
            raise ConfigError(in_config_words(" ".join(str(message).split()), self.config_keys))
        die(message, prog=self.prog)


def in_config_words(message: str, keys: dict[str, str]) -> str:
    """A message about flags reworded for a run config: --rounds -> num-server-rounds, --no-x -> x=false."""

    def key(match: re.Match) -> str:
        name = keys.get(match.group(2), match.group(2))
        return f"{name}=false" if match.group(1) else name

    return re.sub(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)", key, message.replace("argument --", "run config key --"))


def quick_exit() -> None:
    """Skip the interpreter's last garbage collection at exit: with torch loaded it takes 1-3 s and frees
    nothing the operating system would not. Files, logs and atexit handlers still close as usual."""
    atexit.register(gc.freeze)  # registered first, so it runs after every other atexit handler


class NotedSignals:
    """A library's SIGINT/SIGTERM handlers (Flower's), wrapped so that the signal is noted. Theirs raises SystemExit
    wherever the main thread is; inside a weakref callback or a __del__ Python prints and ignores it, and the run
    would go on after "terminated gracefully": `stop_if_received`, called at each step, raises it again."""

    def __init__(self) -> None:
        self.received = 0

    def wrap(self) -> None:
        """Wrap the handlers installed now; silence Python's report of the SystemExit it ignored."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            theirs = signal.getsignal(signum)
            if callable(theirs):

                def noted(received, frame, theirs=theirs) -> None:
                    self.received = received
                    theirs(received, frame)

                signal.signal(signum, noted)
        sys.unraisablehook = _quiet_lost_exit

    def stop_if_received(self) -> None:
        """SystemExit(0), as the wrapped handler raised it, once a signal has arrived."""
        if self.received:
            sys.exit(0)


def _quiet_lost_exit(unraisable) -> None:
    if not isinstance(unraisable.exc_value, SystemExit):  # SystemExit: noted, and raised again
        sys.__unraisablehook__(unraisable)


def die(message: str, prog: str | None = None) -> NoReturn:
    """Print `prog: error: message` on one line to stderr and exit with code 2."""
    prog = prog or Path(sys.argv[0]).name
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _number(kind: type, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0 and v != float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
cosine = _number(float, lambda v: -1 <= v <= 1, "a cosine in [-1, 1]")
proportion = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
port = _number(int, lambda v: 0 <= v <= 65535, "a port in 0..65535")
seed_or_none = _number(int, lambda v: v >= -1, "an integer >= 0, or -1 for none")


def given(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """The destinations of the flags given on the command line, as opposed to left at their defaults."""
    unset = object()
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    # A destination already in the namespace does not get its default, so whatever is not `unset` was given
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {k for k in dests if getattr(parsed, k) is not unset}


def host_port(text: str) -> str:
    """Validate HOST:PORT (IPv6 hosts in brackets, e.g. [::1]:8080) and return it."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or host in ("[", "[]") or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port {port} in {text!r} is not in 1..65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"IPv6 host in {text!r} needs brackets: [{host}]:{port}")
    return text


def bind_problem(address: str) -> str | None:
    """Why nothing can listen on HOST:PORT here (e.g. "Address already in use"), or None."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own: TIME_WAIT is no owner
        try:
            s.bind((host, int(port)))
        except OSError as e:
            return e.strerror or str(e)
    return None


def is_loopback(address: str) -> bool:
    """True when HOST:PORT binds or dials the local machine only."""
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def existing_file(text: str) -> Path:
    """A path to a readable, existing file."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path
