"""python -m soup.eval: suites of evaluation tasks over a model or a run's final/."""
