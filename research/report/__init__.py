"""Reporting helpers: FLOPs estimates (AdaptInfer Eq. 5-7) and figures."""
