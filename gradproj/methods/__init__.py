"""The seed methods, for any diffusers model: the second floor of gradproj.

- :mod:`~gradproj.methods.guidance`: Anti-Memorization Guidance at sampling time (seed 002);
- :mod:`~gradproj.methods.detectors`: memorization detectors (nearest-neighbour
  similarity, its contrast form, the text-conditional noise magnitude) and ROC AUC;
- :mod:`~gradproj.methods.attacks`: embedding search and the DoRI attack (seed 003);
- :mod:`~gradproj.methods.adversarial`: adversarial fine-tuning against it (seed 003);
- :mod:`~gradproj.methods.unlearn`: concept unlearning with gradient surgery (seed 001);
- :mod:`~gradproj.methods.domain_correction`: its adversarial objective, DoCo's PatchGAN
  critic on the predicted clean sample.

They import the library (``gradproj.*``) and never the lab (``gradproj.lab``).
"""
