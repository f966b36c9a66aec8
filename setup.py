"""Installs the oncolake package from lib/.

The pinned stack lives in conf/requirements.txt and is installed by
scripts/setup.sh; install_requires names only what the package imports
everywhere, unpinned, so an editable install never moves a pin.
"""
from setuptools import find_packages, setup

setup(
    name="oncolake",
    version="0.1.0",
    description="Spark and Delta Lake pipeline from raw cancer images to trained CNNs and nightly predictions",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"oncolake": ["py.typed"]},
    python_requires=">=3.11,<3.12",
    install_requires=["pyspark", "delta-spark", "numpy", "pyarrow", "PyYAML"],
)
