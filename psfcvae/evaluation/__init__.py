"""Stage 2, evaluation: held-out metrics, interpolation baselines, figures and report.html."""
