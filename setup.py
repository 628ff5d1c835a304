"""One distribution, `t2i`, installing two import packages: `t2i` and `t2i_kernels`.

The kernels live in the folder kernels/ but install as `t2i_kernels`: a top-level package
called `kernels` would collide with a popular PyPI package that other libraries probe for.
"""

from setuptools import find_packages, setup

setup(
    name="t2i",
    version="0.1.0",
    description="Text-to-image models (DALL-E, Make-A-Scene, Muse/MaskGIT, SSA-GAN) "
    "on one core of hand-written Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["t2i", "t2i.*"]) + ["t2i_kernels"],
    package_dir={"t2i_kernels": "kernels"},
    install_requires=[
        # A range, never a pin: CPU machines install the 2.13.0 CPU build first, GPU users
        # bring their own CUDA build. A range 2.13.0 satisfies installs nothing more.
        "torch>=2.4",
        # The CUDA build of torch 2.13.0 requires exactly triton 3.7.1: pinning the same
        # version lets one set of requirements resolve on CPU and GPU machines alike.
        "triton==3.7.1",
        "einops",
        "webdataset",
        "deepspeed",
        "numpy",
        "pillow",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "hypothesis", "scipy"],
        # CUDA machines only; imported lazily, never required.
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["t2i = t2i.cli:main"]},
)
