from setuptools import find_packages, setup

setup(
    name="skmsif",
    version="0.1.0",
    description=(
        "Multi-stage influence functions for pretrained-then-finetuned PyTorch models, "
        "with a scikit-learn API"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["skmsif", "skmsif.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.23",
        "scipy>=1.12",
        "scikit-learn>=1.3",
        "torch>=2.1",
        "joblib>=1.2",
        "tqdm>=4.60",
    ],
    extras_require={
        "examples": ["matplotlib>=3.5"],
        "skorch": ["skorch>=1.0"],
        "transformers": ["transformers>=4.46"],
        "dask": ["dask[distributed]>=2023.1"],
        "test": ["pytest>=7", "matplotlib>=3.5", "skorch>=1.0", "dask[distributed]>=2023.1",
                 "numpydoc>=1.6", "transformers>=4.46", "hypothesis>=6.0"],
        # sphinx-mathjax-offline: a local MathJax, so the built pages render maths offline
        "docs": ["sphinx>=7.2", "numpydoc>=1.6", "sphinx-gallery>=0.15", "myst-parser>=2.0",
                 "pydata-sphinx-theme>=0.15", "matplotlib>=3.5", "transformers>=4.46",
                 "sphinx-mathjax-offline>=0.0.2"],
    },
    license="BSD-3-Clause",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
