from setuptools import find_packages, setup

setup(
    name="mctf-kernels",
    version="0.1.0",
    description="Multi-criteria Token Fusion (MCTF, CVPR 2024) for Vision Transformers, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mctf", "mctf.*", "mctf_kernels", "mctf_kernels.*"]),
    install_requires=["torch>=2.4", "timm>=1.0", "triton>=3.0"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5"],
        "vis": ["pillow>=9", "matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "mctf-bench=mctf.bench_cli:main",
            "mctf-eval=mctf.eval_cli:main",
            "mctf-visualize=mctf.visualize:main",
        ],
    },
)
