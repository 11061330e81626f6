"""Runs the project's scripts as `python SCRIPT ARGS...` would, each in a fork of one warm interpreter.

The refusal tests start a script dozens of times only to see it reject its input in one line. A fresh
interpreter spends 3-4 s importing torch and Flower before it reads a flag; a fork of this one, which
has imported them once, starts at once. Each run is still a process of its own: its own exit code,
its own stdout and stderr at the file-descriptor level (logging included), nothing shared back.
Requests are JSON lines on stdin ({"script", "args", "cwd", "env": variables to add}); each reply is one JSON line on stdout.
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
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(cwd)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the script died as an uncaught exception kills Python
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import cifar  # noqa: F401 - the imports every fork then skips

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
