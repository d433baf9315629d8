"""Put this folder first on PYTHONPATH and every socket connection and name lookup in that Python
process fails, after being logged (with its stack) to the file named by NO_NETWORK_LOG. The tests
run the command under it to prove that it makes no network request (tests/test_cli.py)."""

import os
import socket
import traceback

_LOG = os.environ.get("NO_NETWORK_LOG")


def _refuse(what):
    def refuse(*args, **kwargs):
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(f"{what}{args[:2]!r}\n{''.join(traceback.format_stack(limit=25))}\n")
        raise OSError(f"no network in this test: {what}{args[:2]!r}")

    return refuse


socket.socket.connect = _refuse("socket.connect")
socket.socket.connect_ex = _refuse("socket.connect_ex")
socket.create_connection = _refuse("socket.create_connection")
socket.getaddrinfo = _refuse("socket.getaddrinfo")
socket.gethostbyname = _refuse("socket.gethostbyname")
