"""Install the retrieval, senet and cvnet packages (pip install -e .)."""

from pathlib import Path

from setuptools import setup

REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="landmark-retrieval",
    version="0.1.0",
    description="Training and evaluation of SENet and CVNet for instance-level image retrieval",
    packages=["retrieval", "senet", "cvnet"]
    + [
        f"retrieval.{sub}"
        for sub in ("config", "modeling", "data", "engine", "evaluation", "losses", "benchmarks")
    ],
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={"test": ["pytest", "pytest-timeout", "ruff"]},
)
