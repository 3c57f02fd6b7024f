"""BLIP3-o SigLIP2 -> SANA connector weights: the original `nn.Sequential` <-> `models/sana_connector.py` params.

In the SigLIP2_SANA checkpoint the connector sits under `transformer.connector.` (the `Sana` module's
`connector` attribute); Sequential indices 0 (Linear), 2 (Linear) and 3 (RMSNorm) hold the weights.
"""
from __future__ import annotations

from blip3o_jax.convert.common import Rule, linear_rules, norm_rules

PREFIXES = ("transformer.connector.", "connector.")


def rules(cfg) -> list[Rule]:
    return linear_rules("0", "linear_1") + linear_rules("2", "linear_2") + norm_rules("3", "norm")
