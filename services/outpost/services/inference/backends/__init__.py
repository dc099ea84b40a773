"""Inference backends: one small interface (:class:`~.base.Backend`), one pydantic config per
backend joined into a discriminated union (:data:`~.config.BackendConfig`), and one factory
(:func:`~.factory.build_backend`). Kept free of imports here: the settings import the configs, and
every service must not pay for importing onnxruntime."""
