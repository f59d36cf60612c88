"""A zip of one DICOM series, extracted without trusting it: every member name is checked (absolute paths and
``..`` are refused as the attack they are, zip-slip), members are written under our own names
(``00000.dcm``, ...), never the archive's, and the uncompressed total is counted while extracting (zip bombs).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from medseg.serve.uploads import UploadRejected

MAX_ZIP_MEMBERS = 10_000


def extract_series(archive: Path, folder: Path, max_unzipped: int, filename: str = "upload.zip") -> Path:
    """Extract the files of a zip as ``folder/00000.dcm``, ... (the DICOM reader then checks that they are one
    series and ignores the files that are not DICOM).

    Raises:
        UploadRejected: 400 not a zip, encrypted or damaged members, a member name with ``..`` or an absolute
            path; 413 more than ``max_unzipped`` bytes once uncompressed (counted while extracting, not taken
            from the zip's own claims) or more than 10,000 members.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UploadRejected(400, "bad_request", f"{filename}: not a readable zip ({err})") from err
    with zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise UploadRejected(413, "too_large", f"{filename}: {len(members):,} files, more than "
                                                   f"{MAX_ZIP_MEMBERS:,}")
        for info in members:
            if unsafe_member(info.filename):
                raise UploadRejected(400, "bad_request", f"{filename}: unsafe path {info.filename!r} in the zip "
                                                         "(empty, '.', absolute or with '..')")
            if info.flag_bits & 0x1:
                raise UploadRejected(400, "bad_request", f"{filename}: encrypted member {info.filename!r}")
        members = [info for info in members if not _hidden(info.filename)]
        if sum(info.file_size for info in members) > max_unzipped:
            raise _bomb(filename, max_unzipped)
        folder.mkdir()
        total = 0
        for index, info in enumerate(members):
            try:
                with zf.open(info) as source, open(folder / f"{index:05d}.dcm", "wb") as target:
                    while chunk := source.read(1 << 20):
                        total += len(chunk)
                        if total > max_unzipped:
                            raise _bomb(filename, max_unzipped)
                        target.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
                # damaged data, a compression method zipfile lacks, a password
                raise UploadRejected(400, "bad_request", f"{filename}: member {info.filename!r} cannot be "
                                                         f"extracted ({type(err).__name__}: {err})") from err
    return folder


def unsafe_member(name: str) -> bool:
    """Whether a zip member's name would leave the folder it is extracted to (zip-slip), on any system, or names
    no file at all (``""``, ``"."``, ``"./"``)."""
    normal = name.replace("\\", "/")
    parts = PurePosixPath(normal).parts
    return (not parts or normal.startswith("/") or re.match(r"^[A-Za-z]:", normal) is not None or "\x00" in normal
            or ".." in parts)


def _hidden(name: str) -> bool:
    """macOS resource forks and dot files that archivers add (``__MACOSX/``, ``.DS_Store``)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and (parts[0] == "__MACOSX" or parts[-1].startswith("."))


def _bomb(filename: str, max_unzipped: int) -> UploadRejected:
    return UploadRejected(413, "too_large", f"{filename}: the zip expands to more than {max_unzipped:,} bytes "
                                            "(--max-upload-mb bounds the uncompressed series to 4 times the upload)")
