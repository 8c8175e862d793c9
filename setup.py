from setuptools import find_packages, setup

setup(
    name="codistill",
    version="0.1.0",
    description="Co-distillation of LLMs on DeepSpeed: a teacher and its students trained together",
    packages=find_packages(include=["codistill", "codistill.*"]) + ["codistill.configs"],
    # configs/ ships inside the package too, so a plain (non-editable) install still has its default run
    package_dir={"codistill.configs": "configs"},
    package_data={"codistill.configs": ["*.yaml", "ds/*.json", "examples/*.yaml"]},
    python_requires=">=3.10",
    # torch is pinned in the install command (README): `torch==2.13.0` takes the CPU
    # wheel on CPU-only machines; left open here, deepspeed would pull a CUDA build.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "accelerate>=1.0",  # transformers' DeepSpeed integration (ZeRO-3 construction) needs it
        "datasets>=3.0",
        "tokenizers>=0.20",
        "tensorboard>=2.15",
        "mpi4py>=4.0",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "filelock>=3.12",
        "numpy>=1.24",
        "matplotlib>=3.7",  # codistill-compare plots
    ],
    entry_points={
        "console_scripts": [
            "codistill-train = codistill.commands.train:main",
            "codistill-export = codistill.commands.export:main",
            "codistill-eval = codistill.commands.evaluate:main",
            "codistill-estimate = codistill.commands.estimate:main",
            "codistill-compare = codistill.commands.compare:main",
            "codistill-bench-step = codistill.commands.bench_step:main",
            "codistill-bench-memory = codistill.commands.bench_memory:main",
            "codistill-bench-build = codistill.commands.bench_build:main",
            "codistill-bench-loss = codistill.commands.bench_loss:main",
            "codistill-cache-logits = codistill.commands.cache_logits:main",
            "codistill-cache-quality = codistill.commands.cache_quality:main",
            "codistill-generate = codistill.commands.generate:main",
            "codistill-prepare-corpus = codistill.commands.prepare_corpus:main",
        ],
    },
    extras_require={
        # An MPI for `mpirun -np N python launch/train.py` (bundles its libraries and mpirun).
        "mpi": ["mpich>=4.1"],
        # xdist: two test files at a time (pytest.ini); psutil: the tests find and signal a run's ranks
        "test": ["pytest>=8", "pytest-xdist>=3.5", "mpich>=4.1", "psutil>=5.9"],
    },
)
