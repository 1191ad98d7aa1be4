"""``python -m torchmesa ...``: the ``torchmesa`` command."""

from torchmesa.apps.cli import main

raise SystemExit(main())
