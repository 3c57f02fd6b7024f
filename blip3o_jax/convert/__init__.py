"""Weight conversion between PyTorch state dicts (checkpoint key names) and our Flax params.

`from_torch(kind, state_dict, cfg)` and `to_torch(kind, params, cfg)` run the one engine in `convert/common.py`
over the rule table of the kind's converter file (`convert/qwen.py`, `convert/dit.py`, ...; the model registry
names it), so the tables read side by side and every kind is equally strict.
"""
from __future__ import annotations

from blip3o_jax.convert.common import ConversionError, load_state_dict  # noqa: F401
from blip3o_jax.convert.common import engine_from_torch as from_torch  # noqa: F401
from blip3o_jax.convert.common import engine_to_torch as to_torch  # noqa: F401
from blip3o_jax.convert.common import expected_shapes  # noqa: F401
