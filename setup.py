"""dials-gapfill: process a rotation sweep with missing or bad images in one command.

DIALS, dxtbx and cctbx are not on PyPI and are deliberately not listed in
install_requires: install DIALS first (Debian: ``apt-get install dials``; conda:
``conda install -c conda-forge dials``), then install this package into the same
Python (a venv made with ``--system-site-packages`` on Debian).
"""

from setuptools import find_packages, setup

setup(
    name="dials-gapfill",
    version="0.1.0",
    description="dials.process_gapped: one command for rotation sweeps with missing or bad images",
    long_description=__doc__,
    packages=find_packages(include=["dials_gapfill", "dials_gapfill.*"]),
    package_data={"dials_gapfill": ["report/*.json", "report/templates/*"]},
    python_requires=">=3.9",
    install_requires=[],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "gemmi>=0.5", "jsonschema>=4", "distributed>=2023.1", "dask-jobqueue>=0.8"],
        "bench": ["pyinstrument"],
        # mp.method=slurm|sge|pbs|lsf (README: Running on a cluster)
        "cluster": ["distributed>=2023.1", "dask-jobqueue>=0.8"],
    },
    entry_points={
        "console_scripts": [
            "dials.process_gapped = dials_gapfill.command_line.process_gapped:run",
            "dials.simulate_sweep = dials_gapfill.command_line.simulate_sweep:run",
        ]
    },
)
