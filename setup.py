from setuptools import find_packages, setup

setup(
    name="im_anim_jax",
    version="0.1.0",
    description="IM-Animation (implicit-motion character animation) in JAX/Flax for TPU and GPU",
    python_requires=">=3.10",
    packages=find_packages(include=["im_anim_jax", "im_anim_jax.*",
                                    "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8,<0.9",
        "einops>=0.8,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1,<2",
        "clu>=0.0.12,<0.1",
        "numpy>=2.0,<3",
        "absl-py>=2.0,<3",
        "tensorboardX>=2.6,<3",
        "imageio>=2.37,<3",
        "av>=14,<19",
        "pillow>=10,<13",
        "safetensors>=0.4,<1",
        "ml-dtypes>=0.5,<1",
        "scipy>=1.13,<2",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # pytest 9.2 ignores the Item._nodeid that xdist 3.8's --dist loadgroup sets (groups lost)
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.8,<4", "torch==2.13.0",
                 "scikit-image>=0.24,<1", "hypothesis>=6.100,<7"],
    },
)
