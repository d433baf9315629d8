"""``python -m fisherlora``: the ``fisherlora`` command, as launchers run it
(``torchrun --nproc-per-node N -m fisherlora init ...``, ``accelerate launch -m fisherlora init ...``)."""

import sys

from fisherlora.cli import main

sys.exit(main())
