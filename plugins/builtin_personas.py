"""Registers the persona bundles shipped in ``hyperlex.personas``, like any other plugin would."""

from __future__ import annotations

from pathlib import Path

import hyperlex.personas
from hyperlex import hookimpl

BUNDLES_ROOT = Path(hyperlex.personas.__file__).parent


@hookimpl
def register_personas(register):
    for bundle in sorted(BUNDLES_ROOT.iterdir()):
        if (bundle / "persona.yaml").is_file():
            register(bundle)
