"""MoETuner expert placement, no torch: which expert-parallel rank holds each (layer, expert).

  io.py               routing profiles, placement validity, placement.json, synthetic profiles
  metrics.py          balancedness, cross-rank traffic, the modelled step time (cost model)
  mip.py              the HiGHS MIP wrapper and scipy's linear assignment, shared by the stages
  stage1_clusters.py  MoETuner stage 1: each layer's experts in R balanced clusters (ILP)
  stage2_chain.py     MoETuner stage 2: clusters onto ranks, chained over layers (cross-layer traffic)
  stage3_refine.py    kiln's stage 3: single-expert moves that cut traffic under a balance floor
  coselect.py         the training objective: co-locate experts one token chooses together
  strategies.py       place(): contiguous, round_robin, greedy_lpt and ilp (stages 1-2, + 3 with refine)
"""
from kiln.parallel.placement.strategies import *  # noqa: F401,F403 (the public API, see __all__)
from kiln.parallel.placement.strategies import __all__  # noqa: F401
