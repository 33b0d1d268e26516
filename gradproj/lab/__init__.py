"""The lab: a synthetic captioned-image world and the experiments run on it (the top floor).

- :mod:`~gradproj.lab.shapes` (data) and :mod:`~gradproj.lab.world` (configuration,
  text side, models, the one training recipe, sampling);
- :mod:`~gradproj.lab.probes`: the validated instruments that read samples;
- :mod:`~gradproj.lab.measure`: the one measurement every experiment uses;
- :mod:`~gradproj.lab.defenses`: the registry of training arms and defenses;
- :mod:`~gradproj.lab.report`: summaries, tables, charts and what decides the numbers;
- experiments: :mod:`~gradproj.lab.demo` (``gradproj demo``),
  :mod:`~gradproj.lab.evaluate` (``gradproj unlearn`` / ``evaluate``),
  :mod:`~gradproj.lab.testbed` (the memorization testbed that validates the detectors).

The lab imports the seed methods and the library, never the other way round.
"""
