"""A warm parent for ``run_cli``: imports what the command line needs once (torch, ONNX, ONNX
Runtime, slimdeploy), then forks one child per command, which runs ``python -m slimdeploy ARGS``
as a fresh interpreter would and exits with its own exit code.

Why: an export command spends 3-4 s importing torch and the exporters before any work, and the
suite runs about three hundred commands. A forked child still is a real process (its own exit
code, stdout, stderr, ``atexit`` and interpreter shutdown), so the tests still see what a user's
shell sees. ``tests/conftest.py`` uses this only for commands run in the suite's own
environment; a command with another environment (``PYTHONPATH`` stand-ins, blockers, a narrow
``COLUMNS``) gets a plain subprocess.

Protocol (one JSON object per line): the test process writes ``{"args", "cwd", "env", "out",
"err"}`` on stdin; this process answers ``{"pid": N}`` when the child starts and ``{"code": C}``
when it has exited.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback


def _warm() -> None:
    """Import what commands import (import only: no thread pool is started before a fork)."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch
    import torch.onnx  # noqa: F401

    import slimdeploy.cli
    import slimdeploy.export  # noqa: F401


def _child(request: dict) -> None:
    """In the forked child: become ``python -m slimdeploy ARGS`` run in ``cwd``; never returns
    (exits with the command's code, or 1 and a traceback if it raised, as the interpreter would)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for source, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(source, target)
        os.close(source)
    # ``python -m`` puts the working directory first on the import path (a factory named as
    # ``module:function`` is found there).
    sys.path[0] = os.getcwd()
    sys.argv = ["slimdeploy", *request["args"]]
    code: int = 0
    try:
        runpy.run_module("slimdeploy", run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # what the interpreter does with it at exit
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: its traceback, exit 1
        traceback.print_exc()
        code = 1
    # The interpreter's own shutdown can wait forever on locks held at the fork by the warm
    # parent's threads; run the exit handlers and leave.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """Answer requests until stdin closes."""
    _warm()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
