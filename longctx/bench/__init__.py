"""The comparison harness behind ``longctx bench``: settings (``presets``), training and measuring (``run``), the
report; and ``longctx throughput`` (``throughput_presets``, ``throughput``)."""
