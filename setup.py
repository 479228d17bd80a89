from setuptools import find_packages, setup

setup(
    name="ecellm",
    version="0.1.0",
    description="eCeLLM in pure PyTorch: LoRA instruction tuning of LLMs on ECInstruct (e-commerce tasks).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ecellm", "ecellm.*"]),
    entry_points={"console_scripts": ["ecellm = ecellm.cli:main"]},
    # torch is deliberately not pinned exactly: install the build that fits your machine first. 2.6 is the
    # first release with what training uses: torch.nn.utils.get_total_norm, FSDP2's torch.distributed.fsdp.fully_shard.
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.15",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # GGUF import (the embedded SmolLM2 default ships as a GGUF file).
        "gguf": ["gguf>=0.10"],
        # Reading the clothing reviews (a brotli parquet) for `ecellm data build clothing-reviews`.
        "real": ["pyarrow>=14"],
        # The examples' curve.png (training loss and the metric against minutes).
        "plot": ["matplotlib>=3.5"],
        # Tests: pytest plus the reference oracles our outputs must match. Never imported by ecellm/.
        "test": [
            "pytest>=7",
            "transformers>=4.45",
            "peft>=0.13",
            "scikit-learn>=1.3",
            "gguf>=0.10",
            "pandas>=2.0",
            "pyarrow>=14",
            "bitsandbytes>=0.50",  # the NF4 oracle (tests/test_nf4.py); its CPU wheel, no GPU needed
            "bert-score>=0.3.13",  # the F_BERT oracle (tests/models/test_bert.py)
            "ruff==0.17.6",  # the linter .ci/run runs (rules in ruff.toml); pinned: new releases add rules
        ],
    },
)
