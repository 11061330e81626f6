"""Runs the project's scripts as `python SCRIPT ARGS...` would, each in a fork of one warm interpreter.

The refusal tests start a script dozens of times only to see it reject its input in one line. A fresh
interpreter spends 3-4 s importing torch and Flower before it reads a flag; a fork of this one, which
has imported them once, starts at once. Each run is still a process of its own: its own exit code,
its own stdout and stderr at the file-descriptor level (logging included), nothing shared back.
Requests are JSON lines on stdin ({"script", "args", "cwd", "env": variables to add}); each reply is
one JSON line on stdout.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(script: str, args: list[str], cwd: str, env: dict[str, str], out: int, err: int) -> None:
    """In the fork: the script's output to the two files, its environment, its code as __main__, then exit."""
    os.environ.update(env)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests' pipe is the worker's, not the script's
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(cwd)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:  # sys.exit("message") prints it and exits 1, as Python does
        if isinstance(e.code, int | None):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the script died as an uncaught exception kills Python
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    # The imports every fork then skips: torch (cifar) and Flower (client, server, run)
    import cifar  # noqa: F401
    import client  # noqa: F401
    import run  # noqa: F401
    import server  # noqa: F401

    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                child(request["script"], request["args"], request["cwd"], request["env"], out.fileno(), err.fileno())
            status = os.waitpid(pid, 0)[1]
            code = os.waitstatus_to_exitcode(status)
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
        replies.write(json.dumps({"code": code, "stdout": texts[0], "stderr": texts[1]}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
