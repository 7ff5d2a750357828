"""Runtimes: one protocol (`base`), several implementations (`native`, ...)."""
