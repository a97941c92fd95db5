from setuptools import find_packages, setup

setup(
    name="mctf-kernels",
    version="0.1.0",
    description="Multi-criteria Token Fusion (MCTF, CVPR 2024) for Vision Transformers, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="the mctf-kernels authors",
    url="https://github.com/mctf-kernels/mctf-kernels",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    keywords="vision transformer, token merging, token fusion, MCTF, timm, triton",
    python_requires=">=3.10",
    packages=find_packages(include=["mctf", "mctf.*", "mctf_kernels", "mctf_kernels.*"]),
    # loose floors: torch 2.6 for torch.library.triton_op, timm 1.0 for the VisionTransformer API
    install_requires=["torch>=2.6", "timm>=1.0", "triton>=3.0"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5"],
        "vis": ["pillow>=9", "matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "mctf-bench=mctf.cli.bench:main",
            "mctf-eval=mctf.cli.eval:main",
            "mctf-visualize=mctf.cli.visualize:main",
            "mctf-train=mctf.cli.train:main",
        ],
    },
)
