"""Around the operator: the ``fascore`` command line (``cli``), conformance (``check``),
benchmarks (``bench``), the demo (``demo``), recording runs (``capture``) and comparing an NPU
run with the reference (``compare``)."""
