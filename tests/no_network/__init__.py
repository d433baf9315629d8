"""``no_network_env``: the environment of a test subprocess that may not reach the network. This
folder's ``sitecustomize.py`` is what enforces it once the folder is first on ``PYTHONPATH``."""

import os
from pathlib import Path

NO_NETWORK = Path(__file__).parent


def no_network_env(log: Path) -> dict:
    """The environment of a process whose every connection and name lookup fails and is logged
    to ``log`` (tests/no_network/sitecustomize.py), with none of the Hugging Face offline switches
    set: the command must keep itself offline."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(NO_NETWORK), *filter(None, [env.get("PYTHONPATH")])])
    env["NO_NETWORK_LOG"] = str(log)
    return env
