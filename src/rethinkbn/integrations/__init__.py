"""Integrations with training frameworks; each submodule imports its framework on import.

    from rethinkbn.integrations.lightning import FreezeBN, PreciseBN  # needs lightning
"""
