"""The studies themselves, one module each (``rethinkbn_studies.STUDY_MODULES``, in report
order); each registers its ``run`` with ``register_study`` on import."""
