"""blip3o-jax: a JAX/Flax implementation of BLIP3-o.

Every dependency is pinned to an exact version known to install and work together on Python 3.11.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "einops==0.8.2",
    "clu==0.0.12",
    "safetensors==0.8.0",
    "transformers==5.24.0",  # tokenizers only at run time; the PyTorch models are used in tests
    "tokenizers==0.23.3",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "absl-py==2.5.1",
]

EXTRAS = {
    # PyTorch references for parity tests and the side-by-side benchmarks. torch 2.13.0 is the CPU build.
    # timm is deliberately absent: it needs torchvision, and no torchvision on PyPI imports beside torch 2.13.0;
    # the EVA-CLIP reference is built from torch layers in the tests instead (see tests/test_eva_clip.py).
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # make test: two workers, one per core (see Makefile)
        "execnet==2.1.2",
        "torch==2.13.0",
        "diffusers==0.42.1",
        "webdataset==1.0.2",
        "datasets==5.2.0",
        "tensorflow-datasets==4.9.10",  # tests/test_tfds.py; no TensorFlow (see the tfds extra)
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
    # TFDS ArrayRecord datasets (data/tfds_source.py, data/tfds_builder.py): written and read with NumPy, without
    # TensorFlow; 12 small wheels, ~41 MB installed. array-record is Grain's own dependency, pinned here as used.
    "tfds": ["tensorflow-datasets==4.9.10", "array-record==0.8.6"],
}

setup(
    name="blip3o-jax",
    version="0.1.0",
    description="BLIP3-o (unified multimodal understanding and generation) in JAX/Flax",
    packages=find_packages(include=["blip3o_jax", "blip3o_jax.*"]),
    py_modules=["convert_torch_weights"],
    # the CPU decode kernel's source, compiled at first use (blip3o_jax/kernels/__init__.py)
    package_data={"blip3o_jax.kernels": ["*.cc"]},
    python_requires=">=3.11,<3.12",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "blip3o-convert=convert_torch_weights:main",
            "blip3o-train=blip3o_jax.train:main",
            "blip3o-precompute=blip3o_jax.precompute:main",
            "blip3o-plan=blip3o_jax.plan:main",
            "blip3o-sample=blip3o_jax.sample:main",
        ]
    },
)
