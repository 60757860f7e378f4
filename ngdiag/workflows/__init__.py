"""Workflows: the audit, the sensitivity run and the comparison of training runs, each a function with
a config and a typed result, built on the run engine (:mod:`ngdiag.runs`)."""
