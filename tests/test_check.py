"""``gradproj check``, run for real on its default."""

from gradproj import check


def test_check_projects_every_backend_to_reference_accuracy():
    results = check.run()
    assert {"unprojected", "reference"} <= results.keys()
    _, before = results.pop("unprojected")
    assert before > 0.1  # the raw gradient does move the concept response
    for name, (err, after) in results.items():
        assert err < 1e-8, name  # |G| ~ 1e-2 here; fp32 kernels land at ~7e-10
        assert after < 1e-6, name  # measured ~9e-8: fp32 rounding (before: ~0.6)
