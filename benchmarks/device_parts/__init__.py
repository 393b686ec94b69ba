"""The parts of ``benchmarks/device_check.sh`` (one module per group of parts; ``device_check.py``
dispatches). Layers, one way: ``common`` <- ``basics``, ``losses``, ``family``, ``models`` <-
``device_check.py``; ``device_targets``/``device_report`` only read the JSON the parts write."""
