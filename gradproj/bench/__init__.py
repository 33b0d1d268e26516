"""The benchmarks that ship with the package: ``gradproj bench``.

:mod:`~gradproj.bench.suite` times every gradproj backend against its peers
(:mod:`~gradproj.bench.peers`, each at its strongest) and writes one JSON file;
:mod:`~gradproj.bench.plot` draws it; :mod:`~gradproj.bench.harness` holds the
buckets and the timing rules they share. A floor above the library (it imports
the library, never the reverse), beside the lab.
"""
