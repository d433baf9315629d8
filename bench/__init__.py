"""Benchmarks (not part of the installed package): ``pytest bench/ --benchmark-only``.

Every model and data set they use is local, so they run offline as ``fisherlora`` does: the
Hugging Face offline switches are set here, before any benchmark imports those libraries (PEFT's
import of bitsandbytes would otherwise ask the Hub for a CPU kernel). A caller who sets one of
them keeps its value."""

import os

from fisherlora.cli import OFFLINE_ENV

for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
