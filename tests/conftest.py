"""Test set-up: 8 simulated CPU devices, CPU only, no Hub access. Must run before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity tests compare against fp32 PyTorch; XLA's default CPU matmul precision is already fp32,
# but make it explicit so a changed default cannot loosen the tests.
jax.config.update("jax_default_matmul_precision", "highest")
