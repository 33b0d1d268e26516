"""NOT torchvision: a minimal stand-in, for ``tests/test_diffusers_examples.py`` only.

The official diffusers training scripts import ``torchvision.transforms`` for a few
image transforms, but PyPI's torchvision does not import beside the pinned CPU
torch (``/work/shared/ENV.md``). That test puts ``tests/stubs`` on the ``PYTHONPATH``
of the script's subprocess only; nothing else (and no installed package) sees this.

It provides only the names those scripts use, written with torch and PIL to match
torchvision's behaviour for what the test feeds them (RGB PIL images, an int
size, no padding); anything else raises rather than guesses. transformers takes
any importable ``torchvision`` for the real one (and imports ``transforms.v2``), so
the test's launcher lets transformers and diffusers decide that torchvision is
absent before it puts this folder on ``sys.path``: only the script sees the stub.
"""

__version__ = "0.0.0+gradproj.stub"
