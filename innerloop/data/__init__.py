"""Task families (data sources)."""

from innerloop.data.regression import FAMILIES, LinearRegression, Sinusoid, make_family

__all__ = ["FAMILIES", "LinearRegression", "Sinusoid", "make_family"]
