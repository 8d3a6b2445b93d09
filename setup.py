"""k15: the Kimi k1.5 RL recipe in JAX."""
import setuptools

# Pinned: JAX, Flax, Orbax and seqio change APIs between releases.
CORE = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=2.0",
    "sentencepiece==0.2.1",
    "tokenizers>=0.22,<0.23",
    "safetensors>=0.6,<0.8",
    "clu==0.0.12",
    "tensorboard>=2.20",  # clu's TensorBoard writer
    "matplotlib>=3.8",
]
DATA = [
    "seqio==0.0.20",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",
    "pyarrow>=15",  # Parquet prompt files
]
TEST = [
    "pytest>=8",
    "psutil>=5.9",  # the sandbox tests check that nothing is left running
    "torch==2.13.0",  # the CPU wheel on this machine's disk; plain `torch` pulls a CUDA build
    "transformers==5.12.1",  # kept at 5.12.x so google-tunix (safetensors<0.8) installs beside it
]
NOTEBOOK = [  # notebooks/ executed with parameters (the tests run them at smoke size)
    "papermill==2.7.0",
    "nbclient==0.10.4",
    "nbformat==5.10.4",
    "ipykernel==7.4.0",
]

setuptools.setup(
    name="k15",
    version="0.1.0",
    description="The Kimi k1.5 reinforcement-learning recipe in JAX",
    packages=setuptools.find_packages(include=["k15", "k15.*", "experiments", "experiments.*"]),
    package_data={"k15.sampling.native": ["kernels.cc"]},  # compiled on first use
    python_requires=">=3.11",
    install_requires=CORE + DATA,
    extras_require={
        "test": TEST + NOTEBOOK,
        "notebook": NOTEBOOK,
        "math": ["math-verify==0.9.0"],
        "gcs": ["google-cloud-storage>=2.14"],  # orbax asks the bucket's layout when it deletes checkpoints in gs://
        "bench": ["google-tunix==0.1.7"],
    },
)
