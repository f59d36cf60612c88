"""Receiving an upload: the multipart body streamed to one file under the request's own folder, the size limit
enforced while it arrives, then what the bytes are (NIfTI, PNG, a zip of one DICOM series) told from their
content, never from the client's file name.

Nothing the client names becomes a path: the upload is written as ``upload.bin`` and renamed ``image.nii.gz``,
``image.nii`` or ``image.png``; a zip is extracted as ``series/00000.dcm``, ... (:mod:`medseg.serve.zipped`).
Every refusal is an :class:`UploadRejected` carrying its HTTP status, its kind (the log's ``status``) and a
one-line reason.
"""

from __future__ import annotations

import asyncio
import unicodedata
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medseg.data.io import ImageReadError, read_header

FIELD_LIMIT = 1024
"""The most bytes of a form field other than the file (``case``, ``patient``)."""
BODY_OVERHEAD = 64 * 1024
"""Bytes a multipart body may hold beyond the file: boundaries, part headers, the small fields."""
NIFTI1_MAGIC = (b"n+1\x00", b"ni1\x00")
NIFTI2_MAGIC = (b"n+2\x00", b"ni2\x00")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
SUPPORTED = "a NIfTI image (.nii/.nii.gz), a PNG (2D models) or a zip of one DICOM series"


class UploadRejected(Exception):
    """An upload refused before any prediction. ``str`` is the reason (one line)."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


@dataclass
class Upload:
    """A received upload.

    Attributes:
        path: where its bytes are (inside the request's folder; our name, not the client's).
        filename: the client's file name, for messages and the default case id only.
        fields: the other form fields (``case``, ``patient``), as text.
        size: bytes of the file.
    """

    path: Path
    filename: str
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0


@dataclass
class Prepared:
    """An upload ready for ``model.predict``.

    Attributes:
        kind: ``"nifti"``, ``"png"`` or ``"dicom"`` (the log's ``input``).
        path: the image file, or the folder of the DICOM series.
        shape: the image's shape from its header(s).
    """

    kind: str
    path: Path
    shape: tuple[int, ...] = ()


async def receive_upload(headers: Any, stream: AsyncIterator[bytes], folder: Path, max_bytes: int,
                         timeout_s: float | None = None) -> Upload:
    """Stream a ``multipart/form-data`` body into ``folder/upload.bin``, at most ``max_bytes`` of file, within
    ``timeout_s`` seconds for the whole body.

    The declared ``Content-Length`` is checked first, then the bytes as they come (a client may not declare it,
    or lie): reading stops at the first byte over the limit. A client that leaves mid-upload raises what
    ``stream`` raises (Starlette's ``ClientDisconnect``), unchanged: that is not a bad form.

    Raises:
        UploadRejected: 413 too large; 415 not a multipart form; 408 not received within ``timeout_s``; 400 a
            damaged form, no ``file`` part, two files, an oversized field, a field that is not UTF-8.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    limit = max_bytes + BODY_OVERHEAD
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), max_bytes)
    content_type, options = parse_options_header(headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise UploadRejected(415, "unsupported", "send the image as a multipart/form-data field 'file' "
                                                 "(curl -F file=@scan.nii.gz)")
    form = _Form(folder / "upload.bin", max_bytes)
    parser = MultipartParser(options[b"boundary"], form.callbacks())
    try:
        async with asyncio.timeout(timeout_s):
            received = 0
            async for chunk in stream:  # a client that leaves raises here: passed on as it is
                received += len(chunk)
                if received > limit:
                    raise too_large(received, max_bytes)
                _parse(parser.write, chunk)
            _parse(parser.finalize)
    except TimeoutError:
        raise UploadRejected(408, "timeout", f"the upload did not arrive within {timeout_s:g} s "
                                             "(--upload-timeout)") from None
    finally:
        form.close()
    if form.upload is None:
        raise UploadRejected(400, "bad_request", "no file in the form: send the image as the field 'file'")
    form.upload.fields = form.fields
    return form.upload


def _parse(step: Any, *args: Any) -> None:
    """One step of the multipart parser; its errors are the form's: 400."""
    try:
        step(*args)
    except UploadRejected:
        raise
    except Exception as err:  # python_multipart's MultipartParseError, a part without a name, ...
        raise UploadRejected(400, "bad_request", f"damaged multipart form ({type(err).__name__}: {err})") from err


def identifier(value: str | bytes | None, what: str) -> str:
    """A case or patient id as routed and logged, from a form field or a header alike: UTF-8 (header bytes are
    decoded as UTF-8, not Latin-1), NFC-normalised (one spelling of ``ü``), without surrounding white space.

    Raises:
        UploadRejected: 400 bytes that are not UTF-8.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise UploadRejected(400, "bad_request", f"{what}: not UTF-8 text") from None
    return unicodedata.normalize("NFC", value).strip()


def header_value(raw: Any, name: bytes) -> bytes | None:
    """The raw bytes of header ``name`` (lower case) in an ASGI header list, or ``None``."""
    return next((value for key, value in raw if key.lower() == name), None)


def too_large(size: int, max_bytes: int) -> UploadRejected:
    return UploadRejected(413, "too_large", f"the upload ({size:,} bytes so far) is larger than the limit of "
                                            f"{max_bytes:,} bytes (--max-upload-mb)")


class _Form:
    """The callbacks of ``python_multipart``'s parser: the ``file`` part into one file, small fields as text."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self._header = [b"", b""]
        self._disposition = b""
        self._name: str | None = None
        self._value = bytearray()
        self._handle: Any = None

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": lambda d, s, e: self._header.__setitem__(0, self._header[0] + d[s:e]),
                "on_header_value": lambda d, s, e: self._header.__setitem__(1, self._header[1] + d[s:e]),
                "on_header_end": self._header_end, "on_headers_finished": self._headers_finished}

    def _begin(self) -> None:
        self._disposition, self._name, self._value = b"", None, bytearray()

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadRejected(400, "bad_request", "a form part without a name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options or self._name == "file":
            if self._name != "file" or self.upload is not None:
                raise UploadRejected(400, "bad_request", "send one file, as the form field 'file'")
            filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
            self.upload = Upload(self.path, filename)
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed at the part's end or by close()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is not None:
            assert self.upload is not None
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise too_large(self.upload.size, self.max_bytes)
            self._handle.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > FIELD_LIMIT:
                raise UploadRejected(400, "bad_request", f"form field {self._name!r} is longer than {FIELD_LIMIT} "
                                                         "bytes")

    def _end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self._name is not None:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadRejected(400, "bad_request", f"form field {self._name!r}: not UTF-8 text") from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def sniff(path: Path) -> str | None:
    """What the file is from its first bytes: ``"nifti.gz"``, ``"nifti"``, ``"png"``, ``"zip"``,
    ``"broken.gz"`` (a gzip stream that breaks or ends before 348 bytes: truncated), or ``None``.

    A gzip stream counts as NIfTI when its decompressed start is a NIfTI header, read without needing the
    stream's end, so a truncated ``.nii.gz`` is still recognised (the reader then says what is wrong with it).
    """
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if head[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            start = inflater.decompress(head, 540)
        except zlib.error:
            return "broken.gz"
        if _nifti(start):
            return "nifti.gz"
        return "broken.gz" if len(start) < 348 and not inflater.eof else None
    if _nifti(head):
        return "nifti"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head[:4] in ZIP_MAGIC:
        return "zip"
    return None


def _nifti(head: bytes) -> bool:
    return head[344:348] in NIFTI1_MAGIC or head[4:8] in NIFTI2_MAGIC


def prepare(upload: Upload, spatial_dims: int, channels: int, max_voxels: int, max_unzipped: int) -> Prepared:
    """Name the upload by its content and check what can be checked before the model runs.

    The header of a NIfTI or PNG file, or of the DICOM series a zip holds (extracted under ``series/``): its
    claimed size against the file and ``max_voxels``, then dimensionality and channels as ``medseg predict``
    checks them (:func:`medseg.inference.native.check_files`, with the model's ``spatial_dims`` and
    ``channels``).

    Raises:
        UploadRejected: 415 an unknown file type; 400 / 413 a bad zip (see :func:`~medseg.serve.zipped.extract_series`).
        medseg.data.io.ImageReadError, medseg.errors.InputError: a header that cannot be read or used (the
            caller answers 422).
    """
    from medseg.inference.native import check_files
    from medseg.serve.zipped import extract_series

    kind = sniff(upload.path)
    if kind is None:
        raise UploadRejected(415, "unsupported", f"{upload.filename}: not {SUPPORTED}")
    if kind == "broken.gz":
        raise ImageReadError(upload.path, "truncated or damaged gzip stream: it breaks off before a whole "
                                          "NIfTI header")
    if kind == "zip":
        path = upload.path.parent / "series"
        extract_series(upload.path, path, max_unzipped, upload.filename)  # 400 / 413 as UploadRejected
        upload.path.unlink()
    else:
        path = upload.path.rename(upload.path.with_name("image" + {"nifti.gz": ".nii.gz", "nifti": ".nii",
                                                                    "png": ".png"}[kind]))
    shape, _ = read_header(path, max_voxels)  # a series: one series, one grid, a size it can hold
    # the rule of medseg predict; the stand-in carries what check_files reads of a loaded model
    model = SimpleNamespace(hparams={"spatial_dims": spatial_dims, "in_channels": channels})
    check_files(model, [str(path)], max_voxels)  # type: ignore[arg-type]
    return Prepared({"zip": "dicom", "png": "png"}.get(kind, "nifti"), path, tuple(shape))
