"""Optimal-transport solvers (registered in ``OT_SOLVERS``) and UNITER's WRA cost.

Importing this package registers ``ipot``, ``sinkhorn`` and ``exact``; the registry's lazy
location import relies on it. Contract: see :mod:`vlframe.ot.base`.
"""
from vlframe.ot.base import OTSolver
from vlframe.ot.cost import cosine_cost, ot_distance, wra_distance
from vlframe.ot.exact import ExactOT
from vlframe.ot.ipot import IPOT
from vlframe.ot.sinkhorn import Sinkhorn

__all__ = ["OTSolver", "IPOT", "Sinkhorn", "ExactOT", "cosine_cost", "ot_distance", "wra_distance"]
