"""Crash isolation: any runtime hosted in supervised worker processes (`supervisor`), one per model (`child`)."""
